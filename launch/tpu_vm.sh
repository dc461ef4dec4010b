#!/usr/bin/env bash
# Usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE -- <arguments for purecc_jax.main>
# e.g.   launch/tpu_vm.sh purecc us-east5-a v5litepod-8 -- --config=configs/flux_concept.py \
#          --workdir=gs-or-local-dir --config.pretrained=$HOME/FLUX.1-dev --config.concept.path=dog \
#          --config.concept.dreambench_root=$HOME/dreambench --config.mesh.fsdp=8 --config.mesh.data=1
set -euo pipefail
name=$1 zone=$2 type=$3
shift 3
[ "${1:-}" = "--" ] && shift
gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1 ||
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version tpu-ubuntu2204-base
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$(dirname "$0")/.." "$name":purecc-jax
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; cd purecc-jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m purecc_jax.main --distributed $*"
