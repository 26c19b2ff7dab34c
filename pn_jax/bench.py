"""Train-step benchmark: python -m pn_jax.bench --config=configs/bench/gpt2_dense.py

Times the real training step (pn_jax.train: make_train_step, create_state, the optimizer, the
mesh and its shardings, buffer donation) on synthetic random-token batches, so no data pipeline
is needed. Prints one JSON line per configuration: tokens/s, the median step time after warm-up,
MFU (6N + attention FLOPs of the small model, pn_jax.train.flops), compile time, peak device
memory, the bytes each collective moves (pn_jax.parallel.collectives), device kind and config
name. `bench.sweep` adds configurations run in the same process.

`bench.project_finetune` times the path a specialised model trains on: initialise the PN (or
mixture), project one expert with pn_jax.specialize.project, and train the resulting dense model.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from pn_jax import cli, config_overrides
from pn_jax.parallel import xla_flags
from pn_jax.parallel.collectives import collective_bytes

def apply_overrides(config, overrides: str):
  """'model.remat=dots,data.batch_size=16' -> a copy of `config` with those keys set."""
  return config_overrides.applied(config, overrides, "bench.sweep: ")


def synthetic_batch(config, rng):
  """Random tokens (and one cluster per batch when batches are homogeneous), numpy on host."""
  import numpy as np
  B, T = config.data.batch_size, config.data.seq_len
  V, k = config.model.vocab_size, config.model.k
  tokens = rng.integers(0, V, size=(B, T + 1), dtype=np.int32)
  if config.data.cluster_batching == "homogeneous":
    cluster = np.full((B,), rng.integers(0, k), np.int32)
  else:
    cluster = rng.integers(0, k, size=(B,), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((B, T), np.float32), "cluster": cluster}


def _memory_stats(device):
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return stats or {}


def _initial_state(config, model, tx, mesh, rules):
  """-> (config, model, tx, state, shardings) of the model to train: `model` freshly
  initialised, or (bench.project_finetune) the dense projection of a PN/mixture expert."""
  import jax
  from pn_jax.config import ConfigError, routed, small_model_config
  from pn_jax.model import build_model
  from pn_jax.specialize.project import project
  from pn_jax.train.optimizer import make_optimizer
  from pn_jax.train.state import create_state

  rng = jax.random.key(config.seed)
  if not config.bench.project_finetune:
    state, shardings = create_state(model, tx, mesh, rules, rng)
    return config, model, tx, state, shardings
  if not routed(config.model):
    raise ConfigError("config.bench.project_finetune: needs a projected, mixture or "
                      "independent-experts model")
  big, _ = create_state(model, tx, mesh, rules, rng)
  dense_params = jax.jit(lambda p: project(p, config.model, config.bench.cluster)[0])(big.params)
  small_cfg = small_model_config(config.model)
  del big
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = small_cfg
  model = build_model(config.model)
  tx, _ = make_optimizer(config)
  state, shardings = create_state(model, tx, mesh, rules, rng, params=dense_params)
  return config, model, tx, state, shardings


def _check(config) -> None:
  from pn_jax.config import ConfigError
  if config.bench.steps < 1 or config.bench.warmup < 0:
    raise ConfigError("config.bench.steps: need steps >= 1 and warmup >= 0, got "
                      f"steps={config.bench.steps}, warmup={config.bench.warmup}")


def available_bytes(device) -> int | None:
  """What one device can hold: an accelerator's allocator limit; a CPU device's share of the
  host's available memory (its local devices share it). None where neither is known."""
  import jax
  limit = _memory_stats(device).get("bytes_limit")
  if limit:
    return int(limit)
  if device.platform != "cpu":
    return None
  try:
    with open("/proc/meminfo") as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError):
    return None
  return kib * 1024 // jax.local_device_count()


def check_fits(config, memory, device, config_file: str = "") -> None:
  """Refuses a compiled step the device cannot hold, before it runs: GPT-2-small's batch of 32
  needs ~90 GiB on a CPU, where XLA would die allocating it. `config_file` names the :tiny
  variant in the message."""
  from pn_jax.train.memory import GIB, DoesNotFit, step_bytes
  needed, have = step_bytes(memory), available_bytes(device)
  if have is None or needed <= have:
    return
  tiny = f"--config={config_file}:tiny" if config_file else "its config file's :tiny variant"
  raise DoesNotFit(
      f"{config.name}: the compiled train step needs {needed / GIB:.1f} GiB per device, the "
      f"{device.platform} device ({device.device_kind}) has {have / GIB:.1f} GiB available; on a "
      f"CPU run the :tiny variant ({tiny}), elsewhere lower data.batch_size or set model.remat")


def _compile(step_fn, state, batch) -> dict:
  """AOT-compiles the train step; -> {compiled, compile_s, memory, hlo_text}."""
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  return {"compiled": compiled, "compile_s": time.perf_counter() - t0,
          "memory": compiled.memory_analysis(), "hlo_text": compiled.as_text()}


def _time_steps(compiled, state, batches, b, profile_dir: str):
  """Warm-up, then `b.steps` steps timed one by one and `b.steps` back to back (as the training
  loop runs them: host dispatch overlaps the device); then the profiled steps, if asked.
  -> (state, the last metrics, {times, pipelined_s})."""
  import jax
  for i in range(b.warmup):
    state, _ = compiled(state, batches[i % 2])
  jax.block_until_ready(state)
  times = []
  for i in range(b.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for i in range(b.steps):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  pipelined_s = (time.perf_counter() - t0) / b.steps
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for i in range(PROFILE_STEPS):
        state, metrics = compiled(state, batches[i % 2])
      jax.block_until_ready((state, metrics))
  return state, metrics, {"times": times, "pipelined_s": pipelined_s}


def _write_hlo(profile_dir: str, hlo_text: str) -> None:
  """The compiled HLO beside the trace: profile_summary names kernels' ops with it."""
  os.makedirs(profile_dir, exist_ok=True)
  with gzip.open(os.path.join(profile_dir, "hlo.txt.gz"), "wt") as f:
    f.write(hlo_text)


def bench_one(config, *, profile_dir: str = "", config_file: str = "") -> dict:
  """Builds, compiles and times one configuration's train step; returns the JSON record.
  A step the device cannot hold is refused after compiling (`check_fits`)."""
  import jax
  import numpy as np
  from pn_jax.config import validate
  from pn_jax.model import build_model
  from pn_jax.parallel import mesh as mesh_lib
  from pn_jax.train.compile import compile_steps, step_options
  from pn_jax.train.optimizer import make_optimizer

  validate(config, device_count=jax.device_count())
  _check(config)
  mesh = mesh_lib.make_mesh(config)
  rules = mesh_lib.logical_rules(config)
  model = build_model(config.model)
  tx, _ = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    train_cfg, model, tx, state, shardings = _initial_state(config, model, tx, mesh, rules)
    _, schedule = make_optimizer(train_cfg)
    step_fn, _ = compile_steps(model, tx, schedule, mesh, shardings, **step_options(train_cfg))
    rng = np.random.default_rng(config.seed)
    batches = [mesh_lib.global_batch(synthetic_batch(train_cfg, rng), mesh) for _ in range(2)]
    built = _compile(step_fn, state, batches[0])
    check_fits(config, built["memory"], jax.devices()[0], config_file)
    if profile_dir:
      _write_hlo(profile_dir, built["hlo_text"])
    state, metrics, timing = _time_steps(built["compiled"], state, batches, config.bench,
                                         profile_dir)
    measured = {"loss": float(metrics["loss"]),
                "params": sum(x.size for x in jax.tree.leaves(state.params)), **timing, **built}
    del state
  return _record(config, train_cfg, jax.devices()[0], measured)


def _record(config, train_cfg, device, measured: dict) -> dict:
  """The JSON line of one configuration from its `measured` times, compile and loss."""
  import jax
  from pn_jax.config import mesh_shape, small_model_config
  from pn_jax.train import flops as flops_lib
  times, mem = measured["times"], measured["memory"]
  step_s = statistics.median(times)
  B, T = train_cfg.data.batch_size, train_cfg.data.seq_len
  m = train_cfg.model
  model_flops = flops_lib.train_flops_per_step(small_model_config(m), B, T)
  experts = (1 if train_cfg.data.cluster_batching == "homogeneous" else  # weights formed
             min(m.k, B) if m.mixed_mlp == "grouped" else B)
  all_flops = flops_lib.train_flops_per_step(m, B, T, experts_per_step=experts)
  peak = flops_lib.peak_flops(device, config.train.peak_tflops)
  n = jax.device_count()
  stats = _memory_stats(device)
  mib = lambda x: None if x is None else round(x / 2**20, 1)
  return {
      "config": config.name,
      "device_kind": device.device_kind,
      "devices": n,
      "mesh": mesh_shape(train_cfg, n),
      "platform": device.platform,
      "mlp_kind": m.mlp_kind, "arch": m.arch,
      "k": m.k, "h": m.h, "m": m.m,
      "batch": B, "seq_len": T,
      "attention_kernel": "cudnn" if "__cudnn$fmha" in measured["hlo_text"] else "xla",
      # per device and step, from the compiled HLO (the gradient all-reduce of data parallelism)
      "collective_bytes": collective_bytes(measured["hlo_text"]),
      "remat": m.remat, "logits_chunk": m.logits_chunk, "attention": m.attention,
      "scan_layers": m.scan_layers, "mixed_mlp": m.mixed_mlp,
      "basis_dtype": m.basis_dtype, "basis_moments": train_cfg.optim.basis_moments,
      "cluster_batching": train_cfg.data.cluster_batching,
      "params": measured["params"],
      "step_time_s": step_s,
      "step_time_min_s": min(times),
      "step_time_pipelined_s": measured["pipelined_s"],
      "tokens_per_s": B * T / step_s,
      "model_tflops_per_step": model_flops / 1e12,
      "mfu": (model_flops / step_s / (peak * n)) if peak else None,
      "mfu_incl_expert_forming": (all_flops / step_s / (peak * n)) if peak else None,
      "compile_s": measured["compile_s"],
      "peak_mib": mib(stats.get("peak_bytes_in_use")),  # device 0, process-wide
      "compiled_temp_mib": mib(getattr(mem, "temp_size_in_bytes", None)),
      "compiled_args_mib": mib(getattr(mem, "argument_size_in_bytes", None)),
      "loss": measured["loss"],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


PROFILE_STEPS = 3
GEMM_KERNELS = ("gemm", "cutlass", "nvjet", "xmma", "cublas", "gemv", "triton_gemm")
ATTENTION_KERNELS = ("fmha", "flash", "cudnn")


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the jax name stack it came from (its metadata op_name)."""
  out = {}
  for line in hlo_text.splitlines():
    line = line.strip()
    if line.startswith("ROOT "):
      line = line[5:]
    if not line.startswith("%") or 'op_name="' not in line:
      continue
    name = line[1:line.index(" ")].replace(".", "_")  # kernels are named fusion_3, not .3
    out[name] = line.split('op_name="', 1)[1].split('"', 1)[0]
  return out


def _kernel_class(kernel: str, op_name: str) -> str:
  low = kernel.lower()
  if any(s in low for s in ATTENTION_KERNELS) or "dot_product_attention" in op_name:
    return "attention"
  if any(s in low for s in GEMM_KERNELS):
    return "matmul"
  if low.startswith("memcpy") or low.startswith("memset"):
    return "copy"
  if "dynamic_update_slice" in low or "dynamic_slice" in low or low.startswith("loop_broadcast"):
    return "scan_stacking"
  return "other_fusion"


def _phase(op_name: str) -> str:
  if not op_name:
    return "unattributed"  # library kernels (cuBLAS, cuDNN) carry no HLO op name in a graph
  if "cross_entropy" in op_name:
    return "cross_entropy"
  if "optimizer" in op_name:
    return "optimizer"
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other"


# Model parts by the name stack of a kernel's op (first match wins; XLA's own GEMM fusions carry
# one, cuBLAS/cuDNN kernels in a CUDA graph do not and go by _kernel_class). What the "where the
# time goes" tables of docs/benchmarks.md add up.
PARTS = (("pn_forming", "_formed_weights"), ("cross_entropy", "cross_entropy"),
         ("optimizer", "optimizer"))
ELEMENTWISE_PARTS = (("norms", "norm/"), ("attention_other", "/attn/"),
                     ("mlp_elementwise", "/mlp/"))


def profile_part(kernel_class: str, op_name: str) -> str:
  """The model part a kernel's time counts to in `profile_summary`'s part_ms."""
  named = next((part for part, key in PARTS if key in op_name), None)
  if named or kernel_class in ("matmul", "attention", "copy"):
    return named or kernel_class
  return next((part for part, key in ELEMENTWISE_PARTS if key in op_name), "other")


def profile_summary(profile_dir: str, steps: int = PROFILE_STEPS) -> dict:
  """Where device time goes, from the perfetto trace and the HLO written by `bench_one`.

  Kernel time is summed over every GPU event of the trace and divided by `steps`; each kernel
  is classed by its name (matmul / attention / other) and by its HLO op's name stack (forward /
  backward / cross_entropy / optimizer). Fractions are of summed kernel time; `part_ms` is ms
  per step by model part (`PARTS`: norms, the MLP's elementwise ops, PN weight forming, ...).
  """
  traces = glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not traces:
    return {"error": f"no perfetto trace under {profile_dir}"}
  with gzip.open(sorted(traces)[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  hlo_path = os.path.join(profile_dir, "hlo.txt.gz")
  op_names = {}
  if os.path.exists(hlo_path):
    with gzip.open(hlo_path, "rt") as f:
      op_names = _hlo_op_names(f.read())
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  by_class, by_phase, by_part, by_op = (collections.Counter() for _ in range(4))
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    args = e.get("args", {})
    # Kernels inside a CUDA graph (command buffer) are named after their fusion; hlo_op is the
    # command buffer then.
    hlo_op = e["name"] if e["name"] in op_names else args.get("hlo_op", "")
    op_name = op_names.get(hlo_op, "")
    dur = float(e.get("dur", 0.0)) / 1e3 / steps  # ms per step
    kernel_class = _kernel_class(e["name"], op_name)
    by_class[kernel_class] += dur
    by_phase[_phase(op_name)] += dur
    by_part[profile_part(kernel_class, op_name)] += dur
    by_op[e["name"][:60], op_name[-90:]] += dur
  total = sum(by_class.values())
  frac = lambda c: {k: round(v / total, 3) for k, v in c.most_common()} if total else {}
  return {"kernel_ms_per_step": round(total, 3), "by_kernel": frac(by_class),
          "by_phase": frac(by_phase),
          "part_ms": {k: round(v, 3) for k, v in by_part.most_common()},
          "top_ops": [{"op": k[0], "ms": round(v, 3), "name_stack": k[1]}
                      for k, v in by_op.most_common(15)]}


def configurations(config):
  """The base config, then one per `bench.sweep` entry (named after its overrides)."""
  yield config
  for overrides in filter(None, (s.strip() for s in config.bench.sweep.split(";"))):
    variant = apply_overrides(config, overrides)
    with variant.unlocked():
      variant.name = f"{config.name}[{overrides}]"
    yield variant


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.config is None:
    raise cli.UsageError("--config is required, e.g. --config=configs/bench/gpt2_dense.py:tiny")
  xla_flags.apply(FLAGS.xla_preset)  # before the first jax call initialises the backend
  for i, config in enumerate(configurations(FLAGS.config)):
    profile_dir = FLAGS.profile_dir if i == 0 else ""
    record = bench_one(config, profile_dir=profile_dir,
                       config_file=FLAGS["config"].config_filename.partition(":")[0])
    print(json.dumps(record), flush=True)
    if profile_dir:
      print(json.dumps({"profile": config.name, **profile_summary(profile_dir)}), flush=True)


def define_flags():
  """Defined here, not at import: tests import this module next to other absl entry points."""
  config_flags.DEFINE_config_file("config", None, "Bench config (configs/bench/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_enum("xla_preset", "default", sorted(xla_flags.PRESETS),
                    "GPU XLA flags added to XLA_FLAGS (pn_jax/parallel/xla_flags.py).")
  flags.DEFINE_string("profile_dir", "", "If set, a jax.profiler trace of a few timed steps of "
                      "the first configuration is written here.")


def run():
  define_flags()
  app.run(cli.entry(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
