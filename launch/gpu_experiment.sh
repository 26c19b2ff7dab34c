#!/usr/bin/env bash
# One call of the comparison experiment on the lent GPU machine (see launch/gpu_experiment.py):
#   bash launch/gpu_experiment.sh configs/experiments/gpu_small.py [--config.key=value ...]
# Installs the carried wheels, unpacks the carried corpus once per machine, and runs the
# experiment under $ROOT (outside the carried tree, so it survives between calls on one machine)
# for at most $CALL_SECONDS, then stops at a resumable point. Exit 0: done; 143: call again (back
# to back: an idle machine is given back after 30 s, and $ROOT with it). results.json and the
# log come back in $OUT; `python -m pn_jax.experiment --report_only` writes the report here.
set -uo pipefail
config=${1:?usage: gpu_experiment.sh CONFIG [flags...]}; shift
CARRY=${CARRY:-runs/device_carry}
ROOT=${ROOT:-/tmp/pn_exp}
CALL_SECONDS=${CALL_SECONDS:-500}
OUT=${OUT:-/tmp/pn_exp_out}
mkdir -p "$ROOT" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$CARRY"/wheels/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 launch/gpu_experiment.py unpack --carry="$CARRY" --to=/tmp/pn_corpus || exit 3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The outer timeout is a safety net: --max_seconds stops the driver itself, checkpointed.
timeout -s TERM $((CALL_SECONDS + 60)) python3 -m pn_jax.experiment --config="$config" \
  --root="$ROOT" --docs="$ROOT/docs" --config.source=/tmp/pn_corpus \
  --max_seconds="$CALL_SECONDS" "$@" >>"$ROOT/log.txt" 2>&1
rc=$?
grep -v -E "^(I|W)[0-9]{4} " "$ROOT/log.txt" | tail -n 40
cp "$ROOT/results.json" "$ROOT/log.txt" "$OUT/" 2>/dev/null
case $rc in
  0) echo "PN_EXPERIMENT done" ;;
  143) echo "PN_EXPERIMENT stopped at a resumable point: call again" ;;
  *) echo "PN_EXPERIMENT failed (exit $rc): see log.txt" ;;
esac
exit $rc
