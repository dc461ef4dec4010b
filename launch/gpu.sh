#!/usr/bin/env bash
# NVIDIA GPUs: one node with all its GPUs, or several nodes (one process per node).
#
#   launch/gpu.sh install                 # .venv with jax[cuda12] + requirements (once; on a shared
#                                         # filesystem, once for all nodes)
#   launch/gpu.sh run ARGS...             # python -m purecc_jax.main ARGS... on all GPUs of this node
#
# Several nodes: run the same command on every node with the coordinator's address (node 0,
# any free port), the number of nodes and this node's rank (0 .. NUM_PROCESSES-1):
#   COORDINATOR=node0:8476 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu.sh run ARGS...   # on node0
#   COORDINATOR=node0:8476 NUM_PROCESSES=2 PROCESS_ID=1 launch/gpu.sh run ARGS...   # on node1
# Under SLURM (one task per node) JAX reads all three from SLURM: DISTRIBUTED=1 is enough:
#   DISTRIBUTED=1 srun --nodes=2 --ntasks-per-node=1 launch/gpu.sh run ARGS...
# Every node must see the same workdir (a shared filesystem or gs://) and pretrained folder.
set -euo pipefail
cd "$(dirname "$0")/.."

install() {
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck source=/dev/null  # created by install
  . .venv/bin/activate
  pip install -q -r requirements.txt "${JAX_CUDA:-jax[cuda12]==0.10.2}"
}

run() {
  local distributed=()
  if [ -n "${COORDINATOR:-}" ]; then
    distributed=(--distributed "--coordinator_address=$COORDINATOR" "--num_processes=${NUM_PROCESSES:?set NUM_PROCESSES}"
      "--process_id=${PROCESS_ID:?set PROCESS_ID}")
  elif [ "${DISTRIBUTED:-0}" = 1 ]; then
    distributed=(--distributed)
  fi
  # shellcheck source=/dev/null  # created by install
  . .venv/bin/activate
  # Let XLA take the memory it needs up front instead of growing into fragmentation.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
  python -m purecc_jax.main "${distributed[@]}" "$@"
}

command=${1:-}
[ $# -gt 0 ] && shift
case $command in
  install) install ;;
  run) run "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
