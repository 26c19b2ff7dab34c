"""Seconds per training step of pretraining configs, each timed alone on the device: what an
experiment's `pretrain_scale=time:<method>` fits a run's length to.

Equal pretraining device time, done as a user with a budget would do it: a method whose step
costs more trains for fewer steps *with its own full schedule* (warmup and decay fitted to its
length), instead of being cut mid-schedule at a milestone of a longer run. Why the steps are
timed apart from the runs: the parts of a comparison share one GPU (launch/gpu_experiment.sh),
so the training seconds a run logs there are inflated by its neighbours; a step timed alone is
what the method costs on that device. A measurement is keyed by what a step's cost depends on
(`cost_key`), so the runs of one architecture (seeds, learning rates) share it.
"""

from __future__ import annotations

import hashlib
import json
import os

from pn_jax.config import ConfigError

# Scalars of the update, not its work: runs differing only in these share one measurement.
_FREE_OPTIM = ("lr", "min_lr_ratio", "warmup_steps", "decay_steps", "b1", "b2", "eps",
               "weight_decay", "clip_norm", "basis_lr_scale")
_FREE_MODEL = ("code_init", "code_spread")  # the codes' initial values


# Keys added after measurements were saved, at the value those runs had: left out of the digest
# there, so the saved measurements keep their keys.
_LATER = {"optim": {"basis_moments": "float32"}, "model": {"basis_dtype": "float32"}}


def cost_key(c) -> str:
  """A short digest of what one training step's cost depends on: the model, the batch's shape
  and cluster batching, the optimizer (less its scalar hyperparameters) and the mesh."""
  def free(section, keys):
    later = _LATER.get(section, {})
    return {k: v for k, v in c[section].to_dict().items()
            if k not in keys and later.get(k, object()) != v}
  optim = free("optim", _FREE_OPTIM)
  parts = {"model": free("model", _FREE_MODEL),
           "data": {k: c.data[k] for k in ("batch_size", "seq_len", "cluster_batching")},
           "optim": optim, "mesh": c.mesh.to_dict()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read(path: str) -> dict:
  """{cost key: {step_seconds, method, device, ...}}; {} when the file does not exist."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"step costs file {path!r} is unreadable ({e}): delete it and measure "
                      "again (launch/step_costs.py)") from e


def this_device() -> str:
  import jax
  return jax.devices()[0].device_kind


def measure(configs: dict, path: str, warmup: int = 5, steps: int = 30) -> dict:
  """Times each config's train step (pn_jax.bench on synthetic batches of its shapes, steps
  back to back as the training loop runs them) unless `path` holds it for this device already
  (one measured on another device kind is replaced); writes `path` after each, atomically.
  `configs`: {name: run config}. -> the file's contents."""
  import ml_collections
  from pn_jax import bench
  from pn_jax.data import corpus as corpus_lib
  costs = read(path)
  device = this_device()
  for name, c in configs.items():
    key = cost_key(c)
    if costs.get(key, {}).get("device") == device:
      continue
    c = c.copy_and_resolve_references()
    with c.unlocked():
      c.bench = ml_collections.ConfigDict(dict(warmup=warmup, steps=steps, project_finetune=False,
                                               cluster=0, sweep=""))
    record = bench.bench_one(c)
    costs[key] = {"step_seconds": record["step_time_pipelined_s"],
                  "median_step_seconds": record["step_time_s"], "method": name,
                  "device": record["device_kind"], "tokens_per_s": record["tokens_per_s"]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    corpus_lib.write_json(path, costs)
  return costs


def fitted_steps(c, ref_c, costs: dict, path: str, name: str, ref: str,
                 device: str) -> tuple[int, dict]:
  """-> (the steps run `c` can train in the time `ref_c` trains for, at the seconds per step
  of each measured on `device`; the record of both measurements). ConfigError when either is
  missing, or was measured on another device kind (a fit there would not hold here)."""
  missing = [n for n, x in ((name, c), (ref, ref_c)) if cost_key(x) not in costs]
  if missing:
    raise ConfigError(
        f"pretrain_scale=time:{ref} of {name}: no measured step cost of {missing} in {path!r}; "
        "measure them first: python launch/step_costs.py <experiment config> ... "
        f"--out={path}")
  elsewhere = sorted({costs[cost_key(x)]["device"] for x in (c, ref_c)} - {device})
  if elsewhere:
    raise ConfigError(
        f"pretrain_scale=time:{ref} of {name}: the step costs in {path!r} were measured on "
        f"{elsewhere}, this run is on {device!r}; measure them here: python "
        f"launch/step_costs.py <experiment config> ... --out={path}")
  mine, theirs = costs[cost_key(c)], costs[cost_key(ref_c)]
  steps = max(int(ref_c.train.steps * theirs["step_seconds"] / mine["step_seconds"]), 1)
  return steps, {"reference": ref, "step_seconds": mine["step_seconds"],
                 "reference_step_seconds": theirs["step_seconds"], "device": mine["device"]}
