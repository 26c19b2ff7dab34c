"""Before a resume: the checkpoint's saved config compared with the config of this start.

Each checkpoint holds the config it was trained with (Checkpointer.save). Resuming with another
config used to restore the arrays and go on without a word: a changed learning rate or activation
silently made the run a mix of two experiments. Keys fall in three classes:

  shape      the key changes the shapes (or tree) of the parameters or optimizer state, found by
             building both configs' abstract train state (jax.eval_shape): always refused, as the
             arrays cannot be restored; the restore's own shape check stays as the backstop.
  run control  RUN_CONTROL_KEYS: how long, how often, where and on what mesh the run computes,
             logs and saves, not what it learns: allowed silently.
  other      everything else (optim.*, model.activation, seed, data.batch_size, ...): refused
             with a ConfigError listing `key: saved -> now`, unless the user passes
             --allow_config_change; then the run resumes and logs the changed keys.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
from flax import traverse_util
import jax
import ml_collections
from absl import logging

from pn_jax.config import ConfigError, base_config
from pn_jax.model import build_model
from pn_jax.model.transformer import init_params
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.optimizer import make_optimizer

# Keys (or subtrees) a resume may change without --allow_config_change. Each changes how long,
# how often, how fast or where the run computes, logs, evaluates and saves, never the parameters
# it starts from, the updates it applies or the batches it sees:
#   train.steps    documented as allowed: extends (or shortens) the run, and with it the end of
#                  the learning-rate schedule from the restored step on;
#   mesh.*         checkpoints restore onto any mesh (the same arrays, resharded);
#   model.remat / attention / logits_chunk / scan_layers / mixed_mlp: how the same function
#                  is computed (same params, same math up to float rounding);
#   data.eval_batches: how much held-out text an eval reads (early stopping compares the evals
#                  after the change with those before it);
#   data.cache_dir / data_dir / prep_workers: where and how fast data is prepared; the data's
#                  content is checked separately (provenance.py, READY.json);
#   name, sample.*, export.*: a label, and settings the sample and export modes read, not
#                  training.
RUN_CONTROL_KEYS = (
    "name", "train.steps", "train.stop_at_step", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.checkpoint_every_minutes", "train.keep_checkpoints",
    "train.async_checkpoint", "train.progress_bar", "train.peak_tflops", "mesh",
    "model.remat", "model.attention", "model.logits_chunk", "model.scan_layers",
    "model.mixed_mlp",
    "data.eval_batches", "data.cache_dir", "data.data_dir", "data.prep_workers", "sample",
    "export")

ABSENT = "(absent)"
_SHOWN = 20  # changed keys listed in one error line, at most


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as Checkpointer.save stores it (tuples as lists), so equal configs compare
  equal."""
  return json.loads(config.to_json())


def changes(saved: dict, now: dict) -> dict[str, tuple]:
  """{key: (saved value, current value)} for every leaf that differs (ABSENT: not in one)."""
  a, b = flatten(saved), flatten(now)
  return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, ABSENT) != b.get(k, ABSENT)}


def added_since(diff: dict[str, tuple]) -> list[str]:
  """Keys the checkpoint's config lacks and this config holds at pn-jax's default: added by a
  newer pn-jax (a new key's default keeps the old behaviour), so not a change to the run."""
  defaults = flatten(as_json(base_config()))
  return [k for k, (saved, now) in diff.items()
          if saved == ABSENT and k in defaults and now == defaults[k]]


def is_run_control(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in RUN_CONTROL_KEYS)


def state_shapes(config: dict) -> dict[str, tuple | str]:
  """{path: shape, or "dtype shape" for a leaf that is not float32 (model.basis_dtype changes
  only dtypes)} of the train state (params and optimizer state) a config describes, traced
  abstractly as pn_jax.train.state builds it (no arrays are allocated). Keys a checkpoint saved
  before they existed take pn-jax's default (what the run trained with, `added_since`)."""
  filled = {**flatten(as_json(base_config())), **flatten(config)}
  cfg = ml_collections.ConfigDict(traverse_util.unflatten_dict(filled, sep="."))
  model, (tx, _) = build_model(cfg.model), make_optimizer(cfg)

  def init(rng):
    params = init_params(model, rng)
    return {"params": params, "opt_state": tx.init(params)}

  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  tree = jax.eval_shape(init, jax.random.key(0))
  tree = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)
  # Empty nodes (optax.EmptyState of a stateless transformation) count as leaves: adding one
  # changes the tree the checkpoint must be restored into.
  empty = lambda x: isinstance(x, tuple) and not x
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=empty)[0]
  def signature(leaf):
    if empty(leaf):
      return "empty"
    return tuple(leaf.shape) if leaf.dtype == "float32" else f"{leaf.dtype} {tuple(leaf.shape)}"
  return {jax.tree_util.keystr(path): signature(leaf) for path, leaf in flat}


_PARAMS = "['params']"


def _shape_differences(a: dict, b: dict) -> list[str]:
  """`path: checkpoint S, this config S'` per differing leaf, parameters first (their paths
  as the restore's own check writes them)."""
  keys = sorted(set(a) | set(b), key=lambda k: (not k.startswith(_PARAMS), k))
  return [f"{k.removeprefix(_PARAMS)}: checkpoint {a.get(k, 'missing')}, this config "
          f"{b.get(k, 'missing')}" for k in keys if a.get(k) != b.get(k)]


def _shapes_or_none(config: dict) -> dict | None:
  try:
    return state_shapes(config)
  except Exception:  # noqa: BLE001 - a partial change may not build: cannot say, assume it does
    return None


def shape_changing(saved: dict, now: dict, keys: list[str]) -> tuple[list[str], list[str]]:
  """-> (the keys among `keys` that change the train state's shapes, the differing leaves).
  Each key is tried alone on the saved config; if none does alone (only together), all are
  named. ([], []) when the two configs' states have the same shapes."""
  before, after = state_shapes(saved), state_shapes(now)
  leaves = _shape_differences(before, after)
  if not leaves:
    return [], []
  flat_saved, flat_now = flatten(saved), flatten(now)
  culprits = []
  for key in keys:
    trial = dict(flat_saved)
    if flat_now.get(key, ABSENT) is ABSENT:
      trial.pop(key, None)
    else:
      trial[key] = flat_now[key]
    if _shapes_or_none(traverse_util.unflatten_dict(trial, sep=".")) != before:
      culprits.append(key)
  return culprits or list(keys), leaves


def _listing(diff: dict[str, tuple], keys: list[str]) -> str:
  shown = [f"{k}: {json.dumps(diff[k][0])} -> {json.dumps(diff[k][1])}" for k in keys[:_SHOWN]]
  more = f"; and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
  return "; ".join(shown) + more


def saved_config(ckpt: Checkpointer, step: int) -> dict:
  try:
    return ckpt.saved_config(step)
  except Exception as e:  # noqa: BLE001 - orbax raises assorted types on missing or torn files
    raise CheckpointError(f"checkpoint step {step} in {ckpt.directory} has no readable config "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); move "
                          f"{ckpt.directory}/{step} aside to resume from an earlier step, or "
                          "use a fresh --workdir") from e


def check_resume(ckpt: Checkpointer, step: int, config: ml_collections.ConfigDict, *,
                 allow_change: bool = False) -> list[str]:
  """Compares checkpoint `step`'s saved config with `config` before it is restored; raises
  (CheckpointError for shape changes, ConfigError for others unless `allow_change`). -> the
  changed keys that are not run control (allowed: logged as a warning)."""
  saved, now = saved_config(ckpt, step), as_json(config)
  diff = changes(saved, now)
  new = added_since(diff)
  keys = [k for k in diff if not is_run_control(k) and k not in new]
  if not keys:
    return []
  culprits, leaves = shape_changing(saved, now, keys)
  if culprits:
    item, what = (("opt_state", "optimizer") if leaves[0].startswith("['opt_state']") else
                  ("params", "model"))
    raise CheckpointError(
        f"checkpoint step {step} ({item}) does not match this config's {what}: "
        f"{_listing(diff, culprits)} {'changes' if len(culprits) == 1 else 'change'} the shapes "
        f"or dtypes of the parameters or optimizer state ({'; '.join(leaves[:3])}"
        f"{'; ...' if len(leaves) > 3 else ''}); a checkpoint resumes only into the state it was "
        "saved from (--allow_config_change does not apply): revert "
        f"{', '.join(culprits)} or use a fresh --workdir")
  if not allow_change:
    raise ConfigError(
        f"resuming from checkpoint step {step} in {ckpt.directory} with a config that differs "
        f"from the one it was trained with: {_listing(diff, keys)}; rerun with the saved values, "
        "pass --allow_config_change to resume with the new ones, or use a fresh --workdir")
  logging.warning("resuming from step %d with a changed config (--allow_config_change): %s",
                  step, _listing(diff, keys))
  return keys


def refuse_changed_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
  """check_resume against `workdir`'s latest checkpoint, if it has one, before the run prepares
  its data: a refused resume then leaves the workdir's data artefacts as they were too. (fit
  checks again just before restoring, where --allow_config_change is honoured and logged.)"""
  if "://" in workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is not None:
      check_resume(ckpt, step, config, allow_change=False)
  finally:
    ckpt.close()

