#!/bin/bash
# Pretraining on a Cloud TPU VM pod slice: the same command on every worker, one process each.
#
#   TOPOLOGY=v5p:4x4x4 launch/tpu_vm.sh preflight --config=configs/pn.py   # here, no TPU needed
#   TOPOLOGY=v5p:4x4x4 ACCELERATOR_TYPE=v5p-128 RUNTIME_VERSION=v2-alpha-tpuv5 TPU_NAME=my-v5p-64 \
#     ZONE=us-east5-a launch/tpu_vm.sh create --config=configs/pn.py   # preflight, then the slice
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project \
#   REPO_URL=https://github.com/me/pn-jax.git \
#     launch/tpu_vm.sh setup
#   TPU_NAME=... ZONE=... launch/tpu_vm.sh run --config=configs/pn.py --workdir=/mnt/bucket/runs/pn
#   TPU_NAME=... ZONE=... launch/tpu_vm.sh sweep runs/sweep_points.txt   # one point after another
#   TPU_NAME=... ZONE=... launch/tpu_vm.sh stop        # SIGTERM: checkpoint and exit on all workers
#
# preflight  compiles the train step for TOPOLOGY on this machine (python -m pn_jax.aot, needs
#         `pip install -e '.[tpu]'`; only the --config* arguments are used) and prints its memory
#         per chip against HBM; exits 2 if it does not fit or does not shard. Takes no TPU.
# create  preflight, then `gcloud compute tpus tpu-vm create` (ACCELERATOR_TYPE, RUNTIME_VERSION):
#         a config that does not fit never gets a slice.
# setup   clones/updates the repo into ~/pn-jax on every worker and installs it (jax[tpu]).
# run     (after a preflight when TOPOLOGY is set; SKIP_PREFLIGHT=1 skips it)
#         starts `python -m pn_jax.main --distributed=on ARGS` on all workers in the background
#         (nohup; logs in ~/pn-jax/logs/<time>.log on each worker) and tails worker 0's log.
#         jax.distributed finds the coordinator, process count and id from the TPU metadata.
# sweep   runs each line of a file written by `python -m pn_jax.sweep --mode=print` (one pretraining
#         command per point) on all workers, one point after another.
# The workdir must be the same path on all workers (a gcsfuse-mounted bucket, NFS/Filestore): orbax
# checkpoints are written by every worker, data and metrics by worker 0.
set -euo pipefail

preflight() {  # compile for $TOPOLOGY here; only the --config* arguments mean anything to it
  : "${TOPOLOGY:?set TOPOLOGY (e.g. v5p:4x4x4, v5e:4x4) to compile for}"
  local config_args=()
  for a in "$@"; do [[ $a == --config* ]] && config_args+=("$a"); done
  python3 -m pn_jax.aot --topology="$TOPOLOGY" --num_slices="${NUM_SLICES:-1}" "${config_args[@]}"
}

if [ "${1:-}" = preflight ]; then shift; preflight "$@"; exit; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-'~/pn-jax'}
INIT_TIMEOUT_S=${INIT_TIMEOUT_S:-600}

on_all() {  # run a shell command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}

quote_args() { printf '%q ' "$@"; }

cmd=${1:-}
shift || true
case "$cmd" in
  create)
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v5p-128)}" \
      "${RUNTIME_VERSION:?set RUNTIME_VERSION (the TPU VM image)}"
    preflight "$@"
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  setup)
    : "${REPO_URL:?set REPO_URL (git URL of this repository)}"
    on_all "set -e; if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR pull --ff-only; \
      else git clone $REPO_URL $REPO_DIR; fi; cd $REPO_DIR; \
      python3 -m pip install -q -U 'jax[tpu]' -e ."
    ;;
  run)
    [ $# -gt 0 ] || { echo "usage: $0 run --config=... --workdir=..." >&2; exit 1; }
    if [ -n "${TOPOLOGY:-}" ] && [ -z "${SKIP_PREFLIGHT:-}" ]; then preflight "$@"; fi
    args=$(quote_args "$@")
    stamp=$(date +%Y%m%d-%H%M%S)
    on_all "cd $REPO_DIR && mkdir -p logs && nohup python3 -m pn_jax.main --distributed=on \
      --distributed_init_timeout_s=$INIT_TIMEOUT_S $args > logs/$stamp.log 2>&1 & \
      echo \$! > logs/pn_jax.pid"
    echo "started on all workers; worker 0's log (Ctrl-C stops watching, not training):"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -F $REPO_DIR/logs/$stamp.log"
    ;;
  sweep)
    points=${1:?usage: $0 sweep <file of commands from pn_jax.sweep --mode=print>}
    while IFS= read -r line; do
      [ -n "$line" ] || continue
      # Each line is `python -m pn_jax.main ...`: run it on every worker, wait for it to finish.
      rest=${line#* -m pn_jax.main }
      echo "== $rest"
      on_all "cd $REPO_DIR && python3 -m pn_jax.main --distributed=on \
        --distributed_init_timeout_s=$INIT_TIMEOUT_S $rest"
    done < "$points"
    ;;
  stop)
    # SIGTERM to the process `run` started (its pid file): pn_jax checkpoints and exits.
    on_all "cd $REPO_DIR && [ -f logs/pn_jax.pid ] && kill -TERM \$(cat logs/pn_jax.pid) || true"
    ;;
  *)
    echo "usage: $0 preflight ARGS|create ARGS|setup|run ARGS|sweep FILE|stop  (see the header)" >&2
    exit 1
    ;;
esac
