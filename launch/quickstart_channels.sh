#!/usr/bin/env bash
# Create the environment with the channels extra if needed, then prune whole channels of a ResNet-20
# on the bundled digits to half its measured CPU latency and export the smaller model (CPU, minutes).
# Usage: launch/quickstart_channels.sh [section.key=value ...]      e.g. launch/quickstart_channels.sh prune.method=unif
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-channels}"
source launch/env.sh
exec python -m rdprune.run configs/quickstart_channels.yaml "$@"
