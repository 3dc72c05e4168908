#!/usr/bin/env bash
# Create the environment if needed, then prune a small CNN on 5,000 real MNIST digits (CPU, minutes).
# Usage: launch/quickstart.sh [section.key=value ...]      e.g. launch/quickstart.sh prune.method=lamp
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec python -m rdprune.run configs/quickstart.yaml "$@"
