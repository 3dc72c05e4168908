# Sourced by the launch scripts: create .venv with rdprune (and the pip extras in EXTRAS, comma
# separated), then activate it. Reinstalls only when pyproject.toml or EXTRAS changed.
: "${EXTRAS:=}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.rdprune-installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    # No pip cache: the CUDA libraries torch and DALI pull in are several GB, and a cached copy of
    # each would double what the install needs on disk (the stamp above avoids reinstalling anyway).
    .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip setuptools wheel
    # DeepSpeed is an sdist that compiles against the installed torch: build it without isolation
    # (an isolated build would fetch another torch) and without its CUDA ops (DS_BUILD_OPS=0).
    others=$(echo ",$EXTRAS," | sed 's/,deepspeed,/,/g; s/^,//; s/,$//')
    .venv/bin/python -m pip install -q --no-cache-dir -e ".${others:+[$others]}"
    if [ "$others" != "$EXTRAS" ]; then
        DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-cache-dir --no-build-isolation "deepspeed>=0.14"
    fi
    touch "$stamp"
fi
source .venv/bin/activate
