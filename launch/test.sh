#!/usr/bin/env bash
# Run the whole test suite in the project's own environment (.venv), creating it if needed.
# Usage: launch/test.sh [pytest args...]      e.g. launch/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec python -m pytest "$@"
