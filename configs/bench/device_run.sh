#!/usr/bin/env bash
# The benchmark runs behind docs/benchmarks.md, as sent to the device machine (one GPU, H100 or
# H200; the sets `scaling` and `preemption` need two GPUs):
#   bash configs/bench/device_run.sh <set>   (logs and traces land in $OUT, or /tmp/bench_out)
# Each `python -m pn_jax.bench` is its own process so its peak memory is its own.
set -o pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/bench_${1:-main}.jsonl"
bench() {  # bench <label> <args...>
  local label=$1; shift
  echo "### $label: python -m pn_jax.bench $*" | tee -a "$OUT/log.txt"
  timeout 300 python3 -m pn_jax.bench "$@" 2>>"$OUT/log.txt" | tee -a "$log"
}
profile() {  # profile <label> <args...>: also keep the trace and HLO of the first config
  local label=$1; shift
  rm -rf "/tmp/prof_$label"
  bench "$label" "$@" --profile_dir="/tmp/prof_$label"
  cp "$(ls /tmp/prof_$label/plugins/profile/*/perfetto_trace.json.gz | tail -1)" \
    "$OUT/${label}_trace.json.gz" 2>/dev/null
  cp "/tmp/prof_$label/hlo.txt.gz" "$OUT/${label}_hlo.txt.gz" 2>/dev/null
}
case "${1:-main}" in
  main)
    python3 -c "import jax, jaxlib, flax, optax; print(jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, jax.devices())"
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
    profile dense --config=configs/bench/gpt2_dense.py --config.bench.sweep="model.logits_chunk=256"
    profile pn --config=configs/bench/gpt2_pn.py --config.bench.sweep="data.cluster_batching='mixed'"
    bench pn_finetune --config=configs/bench/gpt2_pn.py:finetune=1
    bench mix --config=configs/bench/gpt2_mix.py
    bench dense_noflags --config=configs/bench/gpt2_dense.py --xla_preset=none
    ;;
  r2)  # fused CE (default now), fp32 PN weight forming, unrolled layers
    U=--config.model.scan_layers=False
    profile dense_u --config=configs/bench/gpt2_dense.py $U \
      --config.bench.sweep="model.scan_layers=True;model.logits_chunk=256"
    profile pn_u --config=configs/bench/gpt2_pn.py $U \
      --config.bench.sweep="model.h=8,model.m=4;data.cluster_batching='mixed'"
    bench pn_finetune_u --config=configs/bench/gpt2_pn.py:finetune=1 $U
    bench mix_u --config=configs/bench/gpt2_mix.py $U --config.bench.sweep="data.cluster_batching='mixed'"
    ;;
  r3)  # bench configs now default to scan_layers=False; cuBLASLt (GELU epilogue) trial
    bench dense_default --config=configs/bench/gpt2_dense.py
    XLA_FLAGS="--xla_gpu_enable_cublaslt=true" bench dense_cublaslt --config=configs/bench/gpt2_dense.py
    ;;
  final)  # the merged code at the end of the session (all defaults): re-check nothing regressed
    python3 -c "import jax, jaxlib, flax, optax; print(jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, jax.devices())"
    bench dense_final --config=configs/bench/gpt2_dense.py
    bench pn_final --config=configs/bench/gpt2_pn.py --config.bench.sweep="model.h=8,model.m=4"
    bench pn_finetune_final --config=configs/bench/gpt2_pn.py:finetune=1
    bench mix_final --config=configs/bench/gpt2_mix.py
    ;;
  peer)  # the PyTorch peer (torch.compile, fused AdamW) beside pn-jax's dense step, one GPU, one call
    python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
    echo "### torch_peer" | tee -a "$OUT/log.txt"
    timeout 300 python3 configs/bench/torch_peer.py --config=configs/bench/gpt2_dense.py \
      2>>"$OUT/log.txt" | tee -a "$log"
    bench dense_vs_peer --config=configs/bench/gpt2_dense.py
    ;;
  profile15)  # speed issue, first look: where the dense, one-cluster and mixed PN steps go
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
    profile dense15 --config=configs/bench/gpt2_dense.py
    profile pn_mixed15 --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed
    profile pn_one15 --config=configs/bench/gpt2_pn.py
    echo "### mlp_probe" | tee -a "$OUT/log.txt"
    timeout 300 python3 configs/bench/mlp_probe.py 2>>"$OUT/log.txt" | tee -a "$log"
    ;;
  r15b)  # one-cluster PN forming as a fused reduction; XLA flags on dense; cuDNN ragged dot
    profile pn_one15b --config=configs/bench/gpt2_pn.py --config.bench.sweep="model.h=8,model.m=4"
    XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" bench pn_mixed_dsf \
      --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed
    for f in --xla_gpu_triton_gemm_any=true --xla_gpu_cudnn_gemm_fusion_level=3 \
        --xla_gpu_enable_cublaslt=true; do
      XLA_FLAGS="$f" bench "dense${f}" --config=configs/bench/gpt2_dense.py
    done
    echo "### mlp_probe ragged_dot_fusion" | tee -a "$OUT/log.txt"
    XLA_FLAGS="--xla_gpu_experimental_use_ragged_dot_fusion=true" timeout 200 \
      python3 configs/bench/mlp_probe.py 2>>"$OUT/log.txt" | tee -a "$log"
    ;;
  r15c)  # MLP activation recomputed in the backward (mlp.activate)
    bench dense15c --config=configs/bench/gpt2_dense.py
    bench pn_mixed15c --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed
    ;;
  r15d)  # cross-entropy log Z in one pass over the logits (loss.online_logsumexp)
    profile dense15d --config=configs/bench/gpt2_dense.py
    ;;
  final15)  # the speed issue's table: peer, dense, PN (one-cluster / mixed, h=24 / h=8), mixture,
    # projected fine-tuning, and the grouped (ragged_dot) mixed PN, one GPU, one call
    python3 -c "import jax, torch; print(jax.__version__, torch.__version__, jax.devices())"
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
    echo "### torch_peer" | tee -a "$OUT/log.txt"
    timeout 200 python3 configs/bench/torch_peer.py --config=configs/bench/gpt2_dense.py \
      2>>"$OUT/log.txt" | tee -a "$log"
    bench dense --config=configs/bench/gpt2_dense.py
    bench pn_one --config=configs/bench/gpt2_pn.py --config.bench.sweep="model.h=8,model.m=4"
    bench pn_mixed --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed \
      --config.bench.sweep="model.h=8,model.m=4"
    bench mix --config=configs/bench/gpt2_mix.py --config.bench.sweep="data.cluster_batching='mixed'"
    bench pn_finetune --config=configs/bench/gpt2_pn.py:finetune=1
    bench pn_mixed_grouped --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed \
      --config.model.mixed_mlp=grouped --config.bench.steps=5 --config.bench.warmup=1
    ;;
  speed27)  # issue 27's table, one call: peer, dense, PN one-cluster / mixed at h=24 and h=8, with
    # T's bytes cut (model.basis_dtype=bfloat16, optim.basis_moments), profiles before / after,
    # and the gpu_small miniature's step costs (needs the carried wheels on PYTHONPATH)
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
    B="model.basis_dtype='bfloat16',optim.basis_moments='factored'"
    echo "### torch_peer" | tee -a "$OUT/log.txt"
    timeout 200 python3 configs/bench/torch_peer.py --config=configs/bench/gpt2_dense.py \
      2>>"$OUT/log.txt" | tee -a "$log"
    bench dense --config=configs/bench/gpt2_dense.py
    bench pn_one --config=configs/bench/gpt2_pn.py \
      --config.bench.sweep="model.h=8,model.m=4;$B;model.h=8,model.m=4,$B"
    profile pn_mixed --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed \
      --config.bench.sweep="optim.basis_moments='bfloat16';optim.basis_moments='factored';model.basis_dtype='bfloat16';model.basis_dtype='bfloat16',optim.basis_moments='bfloat16';model.h=8,model.m=4;model.h=8,model.m=4,$B"
    profile pn_mixed_bytes --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed \
      --config.model.basis_dtype=bfloat16 --config.optim.basis_moments=factored
    echo "### miniature step costs" | tee -a "$OUT/log.txt"
    timeout 240 python3 launch/step_costs.py configs/experiments/gpu_small.py:recipe_h \
      configs/experiments/gpu_small.py:basis_bytes --out="$OUT/step_costs_miniature.json" \
      2>>"$OUT/log.txt" | tee -a "$OUT/log.txt"
    ;;
  scaling)  # two GPUs (device kind nvidia-h200-x2): 1 vs 2 GPUs, meshes data=2 and fsdp=2
    export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off (the device notes require it)
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
    nvidia-smi topo -m
    python3 launch/scaling.py --devices=2 --per_device_batch=32 --timeout_s=240 -- \
      --config=configs/bench/gpt2_dense.py 2>>"$OUT/log.txt" | tee "$OUT/scaling_dense.jsonl"
    python3 launch/scaling.py --devices=2 --per_device_batch=32 --timeout_s=240 -- \
      --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed \
      2>>"$OUT/log.txt" | tee "$OUT/scaling_pn_mixed.jsonl"
    ;;
  scaling_b64)  # the PN with twice the work per GPU: does the gradient all-reduce hide?
    export NCCL_NVLS_ENABLE=0
    python3 launch/scaling.py --devices=2 --per_device_batch=64 --meshes=data --timeout_s=240 -- \
      --config=configs/bench/gpt2_pn.py --config.data.cluster_batching=mixed \
      2>>"$OUT/log.txt" | tee "$OUT/scaling_pn_mixed_b64.jsonl"
    ;;
  preemption)  # two GPUs: 2 processes x 1 GPU, SIGTERM to process 1, resume, vs 1 process x 2 GPUs
    export NCCL_NVLS_ENABLE=0
    rm -rf /tmp/preemption
    python3 launch/preemption_check.py --gpus --steps=100 --signal_at_step=40 \
      --workdir=/tmp/preemption -- --config=configs/pn.py | tee "$OUT/preemption.jsonl"
    code=$?
    for f in reference preempted resumed; do xz -c "/tmp/preemption/$f.log" > "$OUT/$f.log.xz"; done
    exit $code
    ;;
  *) echo "unknown set $1"; exit 2 ;;
esac
