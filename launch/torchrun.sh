#!/usr/bin/env bash
# Run rdprune on this machine with one worker per GPU (or 2 workers on CPU) under torchrun.
# Usage: launch/torchrun.sh CONFIG [section.key=value ...]
#        NPROC=4 launch/torchrun.sh configs/resnet50.yaml data.root=/data/imagenet
# Creates .venv on first use (EXTRAS=dali adds NVIDIA DALI). Extra torchrun options: TORCHRUN_ARGS.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: launch/torchrun.sh CONFIG [section.key=value ...]" >&2
    exit 2
fi
# Paths in the command (config, data.root, run.out_dir) stay relative to the caller's directory.
repo="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$repo" && source launch/env.sh)  # create or update the environment
source "$repo/.venv/bin/activate"
if [ -z "${NPROC:-}" ]; then
    NPROC="$(python -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec torchrun --standalone --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} -m rdprune.run "$@"
