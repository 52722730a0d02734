#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one maxlm process per TPU host, all running the same command.
# JAX finds the other hosts itself (jax.distributed.initialize reads the TPU metadata), and the mesh spans
# every chip of the slice; only process 0 writes metrics. The workdir must be shared by all hosts
# (a gs:// bucket path or a mounted filesystem), since every host writes its checkpoint shards there.
#
#   bash launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE WORKDIR [--config.KEY=VALUE ...]
#   e.g. bash launch/tpu_pod.sh maxlm-v5e us-west4-a v5litepod-16 gs://my-bucket/runs/llama1b \
#          --config.mesh.data=1 --config.mesh.fsdp=-1
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3 workdir=$4
shift 4
config=${CONFIG:-configs/llama_1b.py}
repo=${REPO:-https://github.com/maxlm/maxlm.git}

gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
  --version="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  [ -d maxlm ] || git clone $repo maxlm
  cd maxlm && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd maxlm && .venv/bin/python launch/train.py --config=$config --workdir=$workdir $*"
