# Sourced by the launch scripts: create .venv with rdprune and what the tests need, then activate it.
# EXTRAS selects pip extras (default: test). Reinstalls only when pyproject.toml changed.
: "${EXTRAS:=test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.rdprune-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
    touch "$stamp"
fi
source .venv/bin/activate
