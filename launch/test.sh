#!/usr/bin/env bash
# Create the environment if needed (with what the tests need), then run the test suite.
# Usage: launch/test.sh [pytest args...]      e.g. launch/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test,dali,deepspeed}"
source launch/env.sh
exec python -m pytest "$@"
