#!/usr/bin/env bash
# Cloud TPU VMs, one host or a pod slice: every command runs on every worker of the slice.
#
#   launch/tpu_vm.sh check -- ARGS...     # here, no slice: will the run fit TYPE? (purecc_jax.compile_check)
#   launch/tpu_vm.sh create               # the TPU VM (or a queued resource: QUEUED=1), spot with SPOT=1
#   launch/tpu_vm.sh install              # copy this checkout to every worker, install jax[tpu] + requirements
#   launch/tpu_vm.sh run -- ARGS...       # python -m purecc_jax.main --distributed ARGS... on every worker
#   launch/tpu_vm.sh job -- ARGS...       # check, then create + install + run, again after each preemption
#   launch/tpu_vm.sh status | ssh [CMD] | delete
#
# Settings (environment): NAME (purecc), ZONE (us-east5-a), TYPE (v5litepod-8), PROJECT (gcloud's
# default), RUNTIME (picked from TYPE), SPOT=1 (spot capacity), QUEUED=1 (a queued resource
# instead of a plain create), RETRIES (20: preemptions `job` survives), CHECK=0 (`job` without
# `check`), PYTHON (python: the local interpreter `check` runs, with this project and libtpu).
# A resumed run needs the workdir in a bucket: --workdir=gs://BUCKET/runs/dog.
set -euo pipefail

NAME=${NAME:-purecc}
ZONE=${ZONE:-us-east5-a}
TYPE=${TYPE:-v5litepod-8}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
RETRIES=${RETRIES:-20}
CHECK=${CHECK:-1}
PYTHON=${PYTHON:-python}
JAX_TPU=${JAX_TPU:-jax[tpu]==0.10.2}
REPO_DIR=purecc-jax
here=$(cd "$(dirname "$0")/.." && pwd)

runtime_for() {  # the TPU VM software version of an accelerator type
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
RUNTIME=${RUNTIME:-$(runtime_for "$TYPE")}

gtpu() {  # gcloud compute tpus ... with the zone (and project) of this slice
  gcloud compute tpus "$@" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"}
}

on_all_workers() {  # runs a shell command on every worker of the slice at once
  gtpu tpu-vm ssh "$NAME" --worker=all --command "$1"
}

state() {  # READY, CREATING, PREEMPTED, ... or NONE when there is no such VM
  gtpu tpu-vm describe "$NAME" --format='value(state)' 2>/dev/null || echo NONE
}

check() {  # the run's programs compiled by XLA:TPU for TYPE on this machine; non-zero when one does not fit
  (cd "$here" && "$PYTHON" -m purecc_jax.compile_check --topology="$TYPE" "$@")
}

create() {
  if [ "$(state)" != NONE ]; then
    echo "TPU VM $NAME exists ($(state))"
    return
  fi
  local capacity=()
  [ "$SPOT" = 1 ] && capacity=(--spot)
  if [ "$QUEUED" = 1 ]; then
    gtpu queued-resources create "$NAME" --node-id "$NAME" --accelerator-type "$TYPE" \
      --runtime-version "$RUNTIME" "${capacity[@]}"
    echo "waiting for queued resource $NAME"
    until [ "$(gtpu queued-resources describe "$NAME" --format='value(state.state)')" = ACTIVE ]; do
      sleep 60
    done
  else
    gtpu tpu-vm create "$NAME" --accelerator-type "$TYPE" --version "$RUNTIME" "${capacity[@]}"
  fi
}

delete() {
  if [ "$QUEUED" = 1 ]; then
    gtpu queued-resources delete "$NAME" --force --quiet || true
  else
    gtpu tpu-vm delete "$NAME" --quiet || true
  fi
}

install() {
  local archive
  archive=$(mktemp -d)/purecc-jax.tar.gz
  # the tracked and new files of this checkout, without virtual environments or runs
  (cd "$here" && git ls-files --cached --others --exclude-standard -z | tar --null -czf "$archive" -T -)
  gtpu tpu-vm scp "$archive" "$NAME":purecc-jax.tar.gz --worker=all
  on_all_workers "set -e; rm -rf $REPO_DIR; mkdir $REPO_DIR; tar -xzf purecc-jax.tar.gz -C $REPO_DIR; cd $REPO_DIR
    python3 -m venv .venv; . .venv/bin/activate; pip install -q --upgrade pip
    pip install -q -r requirements.txt '$JAX_TPU' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

run() {
  local args
  args=$(printf '%q ' "$@")
  on_all_workers "cd $REPO_DIR && . .venv/bin/activate && python -m purecc_jax.main --distributed $args"
}

job() {  # a spot / preemptible slice disappears or turns PREEMPTED: recreate it and resume from the workdir
  local attempt
  if [ "$CHECK" = 1 ] && ! check "$@"; then
    echo "the run does not fit $TYPE (or could not be checked): no slice created (CHECK=0 skips the check)" >&2
    return 1
  fi
  for ((attempt = 0; attempt <= RETRIES; attempt++)); do
    case $(state) in
      PREEMPTED | TERMINATED) delete ;;
    esac
    create
    install
    if run "$@"; then
      return 0
    fi
    sleep "${PREEMPTION_WAIT:-60}"  # a preempted slice takes a while to leave READY
    case $(state) in
      READY) echo "the job failed on a healthy slice: not retrying" >&2; return 1 ;;
    esac
    echo "slice $NAME is $(state): recreating it and resuming (attempt $((attempt + 1)) of $RETRIES)" >&2
  done
  return 1
}

command=${1:-}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
case $command in
  check) check "$@" ;;
  create) create ;;
  install) install ;;
  run) run "$@" ;;
  job) job "$@" ;;
  status) state ;;
  ssh) gtpu tpu-vm ssh "$NAME" --worker="${WORKER:-0}" ${1:+--command "$*"} ;;
  delete) delete ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
