#!/usr/bin/env bash
# Create the environment if needed (with what the tests need), lint, then run the test suite.
# Usage: launch/test.sh [pytest args...]      e.g. launch/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test,dali,deepspeed,channels,timm,hf}"
source launch/env.sh
python -m ruff check rdprune tests
exec python -m pytest "$@"
