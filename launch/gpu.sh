#!/usr/bin/env bash
# Usage: launch/gpu.sh <arguments for purecc_jax.main>
# e.g.   launch/gpu.sh --config=configs/flux_concept.py --workdir=runs/dog \
#          --config.pretrained=$HOME/FLUX.1-dev --config.concept.path=$HOME/my_dog --config.concept.class_word=dog
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements.txt 'jax[cuda12]==0.10.2'
# Let XLA take the memory it needs up front instead of growing into fragmentation.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
python -m purecc_jax.main "$@"
