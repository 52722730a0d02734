#!/usr/bin/env bash
# All GPUs of one machine: a single process drives every local GPU (no jax.distributed needed); the mesh's
# fsdp axis spans them. Pass other layouts as overrides, e.g. --config.mesh.data=2 --config.mesh.fsdp=4.
#
#   bash launch/multi_gpu.sh configs/gpt2_small.py runs/gpt2 [--config.KEY=VALUE ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
exec .venv/bin/python launch/train.py --config="$config" --workdir="$workdir" \
  --config.mesh.data=1 --config.mesh.fsdp=-1 "$@"
