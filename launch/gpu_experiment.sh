#!/usr/bin/env bash
# One call of the comparison experiment on the lent GPU machine (see launch/gpu_experiment.py):
#   bash launch/gpu_experiment.sh CONFIG [CONFIG ...] [-- flags for every part ...]
# e.g. configs/experiments/gpu_small.py configs/experiments/gpu_small.py:seeds (the parts of one
# comparison). Installs the carried wheels, unpacks the carried corpus once per machine, and runs
# each CONFIG as its own experiment root $ROOT/<tag> (outside the carried tree, so it survives
# between calls on one machine), all as concurrent processes on the one GPU: the first prepares
# the data (corpus, tokenizer, data cache) and pretrains its methods alone (its equal-time view
# compares training seconds, which a second process on the GPU would inflate); the others start
# after that and use its data (--config.data_root). Each runs for at most $CALL_SECONDS of this
# call, then stops at a resumable point. Exit 0: every part done; 143: call again (back to
# back: an idle machine is given back after 30 s, and $ROOT with it). Each part's results.json,
# log and pretraining metrics come back in $OUT as <tag>.tar.xz; `python -m pn_jax.experiment
# --report_only --merge=...` writes the report here (docs/launch.md).
set -uo pipefail
configs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the flags after --
[ ${#configs[@]} -gt 0 ] || {
  echo "usage: gpu_experiment.sh CONFIG [CONFIG ...] [-- flags]"; exit 2; }
CARRY=${CARRY:-runs/device_carry}
ROOT=${ROOT:-/tmp/pn_exp}
CALL_SECONDS=${CALL_SECONDS:-500}
OUT=${OUT:-/tmp/pn_exp_out}
start=$SECONDS
mkdir -p "$ROOT" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$CARRY"/wheels/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The step of every method timed alone, before the parts share the GPU (pretrain_scale=time:...
# fits runs to them; launch/step_costs.py), while the corpus unpacks on the CPU.
python3 launch/step_costs.py "${configs[@]}" --out="$ROOT/step_costs.json" \
  >"$ROOT/step_costs.log" 2>&1 &
costs_pid=$!
python3 launch/gpu_experiment.py unpack --carry="$CARRY" --to=/tmp/pn_corpus || exit 3
wait $costs_pid || { tail -n 20 "$ROOT/step_costs.log"; exit 3; }
python3 -c "import json, sys; [print(f'step {v[\"method\"]}: {1e3 * v[\"step_seconds\"]:.2f} ms')
                                for v in json.load(open(sys.argv[1])).values()]" "$ROOT/step_costs.json"
# Each process takes a share of the GPU's memory instead of JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / ${#configs[@]}, 3))")

tag_of() { local base=${1##*/}; base=${base/.py/}; echo "${base/:/-}"; }
first=$(tag_of "${configs[0]}")
# The first part's results.json gets "equal_time" once all its pretraining runs are done.
pretrained() {
  python3 -c "import json, sys; sys.exit('equal_time' not in json.load(open(sys.argv[1])))" \
    "$ROOT/$first/results.json" 2>/dev/null
}
pids=(); tags=()
for i in "${!configs[@]}"; do
  cfg=${configs[$i]}; tag=$(tag_of "$cfg"); mkdir -p "$ROOT/$tag"
  extra=()
  if [ "$i" -gt 0 ]; then
    while ! pretrained && kill -0 "${pids[0]}" 2>/dev/null; do sleep 2; done
    pretrained || break  # the first part stopped before: the others start in the next call
    extra=(--config.data_root="$ROOT/$first")
  fi
  left=$((CALL_SECONDS - (SECONDS - start)))
  # The outer timeout is a safety net: --max_seconds stops the driver itself, checkpointed.
  timeout -s TERM $((left + 60)) python3 -m pn_jax.experiment --config="$cfg" \
    --root="$ROOT/$tag" --docs="$ROOT/$tag/docs" --config.source=/tmp/pn_corpus \
    --max_seconds="$left" --config.step_costs="$ROOT/step_costs.json" "${extra[@]}" "$@" \
    >>"$ROOT/$tag/log.txt" 2>&1 &
  pids+=($!); tags+=("$tag")
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  tag=${tags[$i]}
  echo "== $tag: exit $rc"
  grep -v -E "^(I|W)[0-9]{4} " "$ROOT/$tag/log.txt" | tail -n 15
  cp "$ROOT/step_costs.json" "$ROOT/$tag/" 2>/dev/null
  (cd "$ROOT/$tag" && tar -cJf "$OUT/$tag.tar.xz" --ignore-failed-read results.json log.txt \
    step_costs.json \
    $(ls pretrain/*/metrics.jsonl pretrain/*/costs.json pretrain_is/*/metrics.jsonl 2>/dev/null))
  if [ $rc -ne 0 ] && [ $status -ne 1 ]; then status=$([ $rc -eq 143 ] && echo 143 || echo 1); fi
done
if [ ${#pids[@]} -lt ${#configs[@]} ] && [ $status -eq 0 ]; then
  echo "the first part ended before its pretraining was done"; status=1
fi
case $status in
  0) echo "PN_EXPERIMENT done" ;;
  143) echo "PN_EXPERIMENT stopped at a resumable point: call again" ;;
  *) echo "PN_EXPERIMENT failed: see the logs" ;;
esac
exit $status
