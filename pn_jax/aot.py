"""Compile the real train step for a TPU slice ahead of time, from a CPU machine:

    python -m pn_jax.aot --config=configs/pn.py --topology=v5p:4x4x4 [--config.mesh.fsdp=8]

With libtpu installed (`pip install -e '.[tpu]'`), jax describes a TPU topology it does not have
(jax.experimental.topologies) and compiles for it. The step is the one `pretrain` runs: the same
model, optimizer, shardings over the config's mesh and donation (train/compile.py), traced on
abstract arguments, so nothing is allocated. `--finetune` compiles the step `specialize` trains
instead: the dense small model one expert projects to (use a one-chip topology, `v5e:1x1`).

The global batch is `--per_chip_batch` sequences per data-parallel chip (the config files'
batches are sized for one machine), or `--config.data.batch_size` when that is given.
Prints one JSON line: topology, chip, mesh, per-device argument/output/temp bytes against the
chip's HBM (fits, margin), compiled FLOPs per step and per device, the MFU ceiling they imply at
the chip's peak, compile time. A step that does not fit also exits 2 with a one-line error
(so a launcher can stop before a pod is requested). Numbers are the TPU compiler's estimates
(docs/scale.md). A step whose buffers exceed HBM is refused by the compiler itself; its
"Used X of Y hbm" is reported the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pn_jax import cli
from pn_jax.train.memory import GIB, DoesNotFit, step_bytes


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, per chip. Public Cloud TPU docs (cloud.google.com/tpu/docs/v4, /v5e,
  /v5p, /v6e: "system architecture" tables; bf16 peak, HBM capacity)."""
  hbm_gib: float
  peak_tflops: float  # dense bf16; pn_jax/train/flops.py's PEAK_FLOPS says the same
  chips_per_host: int  # a 1-chip topology needs chips_per_host_bounds of its own
  pod_type: str  # TPU_ACCELERATOR_TYPE of the slice, {n}: chips (v4, v5p: TensorCores = 2x)
  max_chips: int  # chips in one pod, the largest slice (the same docs' "pod" figures)
  max_side: int = 0  # 2D generations (v5e, v6e: a 16x16 torus): chips per dimension; 0: 3D
  chip_config: str = "default"


CHIPS = {
    "v4": Chip(hbm_gib=32, peak_tflops=275, chips_per_host=4, pod_type="v4-{cores}",
               max_chips=4096, chip_config="megacore"),  # one device per chip, as a v4 VM has
    "v5e": Chip(hbm_gib=16, peak_tflops=197, chips_per_host=4, pod_type="v5litepod-{chips}",
                max_chips=256, max_side=16),
    "v5p": Chip(hbm_gib=95, peak_tflops=459, chips_per_host=4, pod_type="v5p-{cores}",
                max_chips=8960),
    "v6e": Chip(hbm_gib=32, peak_tflops=918, chips_per_host=4, pod_type="v6e-{chips}",
                max_chips=256, max_side=16),
}
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
INSTALL = "pip install -e '.[tpu]'"


def parse_topology(text: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); anything else is a UsageError naming the forms. A slice
  larger than its generation's pod, or 3D for a 2D generation, is refused here: libtpu aborts
  the process on some of them (v5e:1000x1000 exits 134) and silently accepts others."""
  match = TOPOLOGY.match(text or "")
  if not match:
    raise cli.UsageError(f"--topology={text!r}: expected <generation>:<chips per dimension>, "
                         f"e.g. v5e:4x4, v5p:4x4x4, v5e:1x1 (generations: {', '.join(CHIPS)})")
  generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
  if min(dims) < 1:
    raise cli.UsageError(f"--topology={text!r}: every dimension must be >= 1")
  chip, chips = CHIPS[generation], math.prod(dims)
  if chip.max_side and (dims[2:] not in ((), (1,)) or max(dims) > chip.max_side):
    side = chip.max_side
    raise cli.UsageError(f"--topology={text!r}: {generation} slices are 2D, at most {side}x{side}"
                         f" chips (e.g. {generation}:4x4, {generation}:{side}x{side})")
  if chips > chip.max_chips:
    raise cli.UsageError(f"--topology={text!r}: {chips} chips, but a {generation} slice has at "
                         f"most {chip.max_chips} (one pod); use a smaller slice, and "
                         "--num_slices for several")
  return generation, dims


def _libtpu_env(generation: str, chips: int) -> None:
  """libtpu reads the host's TPU identity at load and warns when there is none: say what we
  compile for (these only name the slice to the runtime; the topology is passed explicitly)."""
  cores = chips * (2 if generation in ("v4", "v5p") else 1)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        CHIPS[generation].pod_type.format(chips=chips, cores=cores))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
  # libtpu takes /tmp/libtpu_lockfile so that one process owns the host's chips; a compile
  # opens no chip, so compiles may run side by side (and next to a run on a TPU VM).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `topology` (no TPU needed)."""
  generation, dims = parse_topology(topology)
  if num_slices < 1:
    raise cli.UsageError(f"--num_slices={num_slices}: must be >= 1")
  if importlib.util.find_spec("libtpu") is None:
    raise cli.UsageError(f"libtpu is not installed: compiling for a TPU needs it ({INSTALL})")
  chip, chips = CHIPS[generation], math.prod(dims)
  _libtpu_env(generation, chips)
  import jax
  from jax.experimental import topologies
  kwargs = dict(chip_config_name=chip.chip_config, num_slices=num_slices)
  if chips < chip.chips_per_host:  # a slice smaller than one host: its own host bounds
    kwargs["chips_per_host_bounds"] = (*dims, 1) if len(dims) == 2 else dims
  try:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
    raise cli.UsageError(f"--topology={topology}: libtpu refused it: {cli.one_line(e)}") from e
  return list(topo.devices)


def abstract_batch(config, mesh) -> dict:
  """The pretraining batch as shapes with the batch sharding (bench.synthetic_batch's keys)."""
  import jax
  import numpy as np
  from pn_jax import bench
  from pn_jax.parallel import mesh as mesh_lib
  sharding = mesh_lib.batch_sharding(mesh)
  host = bench.synthetic_batch(config, np.random.default_rng(0))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in host.items()}


def finetune_config(config):
  """The config `specialize` trains with: the dense small model one expert projects to."""
  from pn_jax.config import small_model_config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = small_model_config(config.model)
    if config.data.cluster_batching == "stratified":  # the small model has no experts
      config.data.cluster_batching = "mixed"
  return config


# The TPU compiler refuses a step whose buffers exceed HBM, in one of these forms (libtpu 0.0.4x).
OOM_FORMS = (re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
             re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"))


def oom_bytes(message: str) -> tuple[float, float] | None:
  """(needed, available) bytes from the TPU compiler's out-of-HBM message, else None."""
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  for form in OOM_FORMS:
    match = form.search(message)
    if match:
      return (float(match.group(1)) * scale[match.group(2)],
              float(match.group(3)) * scale[match.group(4)])
  return None


def compile_step(config, devices) -> dict:
  """Builds the real train step (pretrain's model, optimizer, shardings, donation) over
  `devices` and compiles it on abstract arguments.
  -> {compiled (None if the compiler ran out of HBM), oom, compile_s, mesh, params}."""
  import jax
  from pn_jax.config import validate
  from pn_jax.model import build_model
  from pn_jax.parallel import mesh as mesh_lib
  from pn_jax.train.compile import compile_steps, step_options
  from pn_jax.train.optimizer import make_optimizer
  from pn_jax.train.state import state_shardings

  validate(config, device_count=len(devices))
  mesh = mesh_lib.make_mesh(config, devices)
  rules = mesh_lib.logical_rules(config)
  model = build_model(config.model)
  tx, schedule = make_optimizer(config)
  compiled, oom = None, None
  with mesh_lib.activate(mesh, rules):
    state, shardings = state_shardings(model, tx, mesh, rules)
    train_step, _ = compile_steps(model, tx, schedule, mesh, shardings, **step_options(config))
    t0 = time.perf_counter()
    try:
      compiled = train_step.trace(state, abstract_batch(config, mesh)).lower().compile()
    except jax.errors.JaxRuntimeError as e:
      oom = oom_bytes(str(e))
      if oom is None:
        raise
  return {"compiled": compiled, "oom": oom, "compile_s": time.perf_counter() - t0,
          "mesh": dict(mesh.shape), "params": sum(x.size for x in jax.tree.leaves(state.params))}


def _memory(built: dict, hbm_bytes: float) -> dict:
  """Per-device bytes of the compiled step: arguments + outputs - donated (aliased) + temps
  + code, against the chip's HBM."""
  gib = lambda x: round(x / GIB, 3)
  if built["compiled"] is None:  # the compiler refused it: only its own figures are known
    needed, available = built["oom"]
    return {"total_gib": gib(needed), "compiler_hbm_gib": gib(available), "fits": False,
            "margin_gib": gib(hbm_bytes - needed), "compiler_refused": True}
  mem = built["compiled"].memory_analysis()
  parts = {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
           "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
           "code_bytes": mem.generated_code_size_in_bytes}
  total = step_bytes(mem)
  return {**parts, "total_gib": gib(total), "fits": total <= hbm_bytes,
          "margin_gib": gib(hbm_bytes - total)}


def _compiled_flops(compiled) -> float | None:
  """FLOPs of one step on one device, from the compiler's cost analysis."""
  if compiled is None:
    return None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) or None


def report(config, built: dict, *, topology: str, num_slices: int, step: str,
           devices: list) -> dict:
  """The JSON line of one compile: memory against the chip's HBM, FLOPs, MFU ceiling."""
  from pn_jax.config import small_model_config
  from pn_jax.train import flops as flops_lib
  chip = CHIPS[parse_topology(topology)[0]]
  n, B, T = len(devices), config.data.batch_size, config.data.seq_len
  model_flops = flops_lib.train_flops_per_step(small_model_config(config.model), B, T)
  flops_dev = _compiled_flops(built["compiled"])
  peak = chip.peak_tflops * 1e12
  return {
      "config": config.name, "step": step, "topology": topology, "num_slices": num_slices,
      "chip": devices[0].device_kind, "devices": n, "mesh": built["mesh"],
      "mlp_kind": config.model.mlp_kind, "arch": config.model.arch, "k": config.model.k,
      "h": config.model.h,
      "params": built["params"], "batch": B, "seq_len": T, "remat": config.model.remat,
      "scan_layers": config.model.scan_layers, "hbm_gib_per_chip": chip.hbm_gib,
      **_memory(built, chip.hbm_gib * GIB),
      "compiled_tflops_per_device": flops_dev and flops_dev / 1e12,
      "compiled_tflops_per_step": flops_dev and flops_dev * n / 1e12,
      "model_tflops_per_step": model_flops / 1e12,
      # If every device ran its compiled FLOPs at peak: the best step time and the MFU it allows
      # (model FLOPs over compiled FLOPs: recompute, expert forming and overheads lower it).
      # None when the compiler counts fewer FLOPs than the model has: its cost analysis misses
      # some (FSDP steps, docs/scale.md), so no ceiling can be read from it.
      "step_s_at_peak": flops_dev and flops_dev / peak,
      "compiled_over_model_flops": flops_dev and flops_dev * n / model_flops,
      "mfu_ceiling": (model_flops / (flops_dev * n)
                      if flops_dev and flops_dev * n >= model_flops else None),
      "peak_tflops_per_chip": chip.peak_tflops, "compile_s": round(built["compile_s"], 1),
  }


def not_fitting_line(record: dict) -> str:
  """Why a step does not fit, and what to change, in one line."""
  where = (f"{record['config']} ({record['step']} step) on {record['topology']} "
           f"x{record['num_slices']} slice(s), mesh {record['mesh']}")
  need = (f"the TPU compiler ran out of HBM: {record['total_gib']:.2f} GiB needed, "
          f"{record['compiler_hbm_gib']:.2f} GiB available per device"
          if record.get("compiler_refused") else
          f"needs {record['total_gib']:.2f} GiB per device, a {record['chip']} chip has "
          f"{record['hbm_gib_per_chip']} GiB")
  return (f"{where}: {need}; shard it more (mesh.fsdp, mesh.tensor), lower data.batch_size "
          "or set model.remat")


def with_per_chip_batch(config, devices: list, per_chip: int):
  """`config` with data.batch_size = per_chip x the data-parallel chips (mesh data x fsdp): the
  config files' global batches are sized for one machine, a slice's for its chip count."""
  from pn_jax.config import mesh_shape
  sizes = mesh_shape(config, len(devices))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.batch_size = per_chip * sizes["data"] * sizes["fsdp"]
  return config


def aot(config, *, topology: str, num_slices: int = 1, finetune: bool = False,
        per_chip_batch: int = 0) -> dict:
  """Compiles `config`'s pretraining (or, `finetune`, fine-tuning) step for the topology;
  per_chip_batch > 0 sets the global batch from the chip count (else data.batch_size). Logs a
  line as each of its two long stages starts (libtpu's load, the compile: tens of seconds)."""
  logging.info("[1/2] %s x%d slice(s): loading libtpu for the topology", topology, num_slices)
  devices = tpu_devices(topology, num_slices)
  if per_chip_batch > 0:
    config = with_per_chip_batch(config, devices, per_chip_batch)
  if finetune:
    config = finetune_config(config)
  logging.info("[2/2] compiling the %s step for %d %s devices (batch %d)",
               "finetune" if finetune else "pretrain", len(devices), devices[0].device_kind,
               config.data.batch_size)
  built = compile_step(config, devices)
  return report(config, built, topology=topology, num_slices=num_slices,
                step="finetune" if finetune else "pretrain", devices=devices)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.config is None or not FLAGS.topology:
    raise cli.UsageError("--config and --topology are required, e.g. "
                         "--config=configs/pn.py --topology=v5p:4x4x4")
  parse_topology(FLAGS.topology)  # a bad name fails before jax starts
  import jax
  if "JAX_PLATFORMS" not in os.environ:
    # Only the target is compiled for: the host's own backend stays CPU (with libtpu installed
    # and no TPU here, jax would otherwise try, and warn about, a TPU backend).
    jax.config.update("jax_platforms", "cpu")
  # A compile-only executable cannot be read back from the persistent compilation cache (no TPU
  # client to load it into): keep it out, whatever JAX_COMPILATION_CACHE_DIR says.
  jax.config.update("jax_enable_compilation_cache", False)
  # A global batch given on the command line is compiled as given; else --per_chip_batch.
  explicit = "data.batch_size" in config_flags.get_override_values(FLAGS["config"])
  record = aot(FLAGS.config, topology=FLAGS.topology, num_slices=FLAGS.num_slices,
               finetune=FLAGS.finetune, per_chip_batch=0 if explicit else FLAGS.per_chip_batch)
  print(json.dumps(record), flush=True)
  if not record["fits"]:
    raise DoesNotFit(not_fitting_line(record))


def define_flags():
  """Defined here, not at import: tests import this module next to other absl entry points."""
  config_flags.DEFINE_config_file("config", None, "Run config (configs/<kind>.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice to compile for: v4|v5e|v5p|v6e:<AxB[xC]> "
                      "chips, e.g. v5e:4x4 (16 chips), v5p:4x4x4 (64), v5e:1x1 (one chip).")
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network (multi-slice;"
                       " the mesh's data axis spans them).")
  flags.DEFINE_integer("per_chip_batch", 8, "Sequences per data-parallel chip: the compiled "
                       "step's global batch is this x mesh.data x mesh.fsdp, unless "
                       "--config.data.batch_size is given (then that global batch).",
                       lower_bound=1)
  flags.DEFINE_bool("finetune", False, "Compile the fine-tuning step of the dense small model one "
                    "expert projects to (what `specialize` trains) instead of pretraining.")


def run():
  define_flags()
  app.run(cli.entry(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
