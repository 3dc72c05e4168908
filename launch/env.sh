# Sourced by the launch scripts: create .venv with rdprune (and the pip extras in EXTRAS), then
# activate it. Reinstalls only when pyproject.toml or EXTRAS changed.
: "${EXTRAS:=}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.rdprune-installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
    touch "$stamp"
fi
source .venv/bin/activate
