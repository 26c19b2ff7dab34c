"""Reading a saved run: a checkpoint's config and params, and the pretraining run behind it.

A specialized (or distilled) run records `init_from` in its saved config; following that chain
leads to the pretraining run whose tokenizer and clusters every later stage must reuse. The chain
is followed once per loaded checkpoint (`Saved.root`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import ml_collections
import optax
from absl import logging

from pn_jax.config import MLP_KINDS, routed
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.train.checkpoint import CheckpointError, Checkpointer, MissingStep
from pn_jax.train.state import state_shardings


# A finished specialization's result (pn_jax/modes/specialize.py writes it).
RESULT = "specialize.json"
# A finished pruning's result (pn_jax/modes/prune.py): its workdir is a dense run of its own.
PRUNE_RESULT = "prune.json"


@dataclasses.dataclass
class Saved:
  """A run's checkpoint (its latest, unless asked for by step): its config (as saved) and step;
  `chosen` says why this step (what an export records)."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  chosen: str = "latest"

  @property
  def model(self) -> ml_collections.ConfigDict:
    return self.config.model

  def describe(self) -> str:
    m = self.model
    if m.get("independent_experts", False):
      extra = f", k={m.k} independent experts"
    else:
      extra = f", k={m.k}, h={m.h}, m={m.m}" if routed(m) else ""
    if m.get("arch", "gpt") != "gpt":  # saved before model.arch existed: gpt
      extra += f", arch={m.arch}"
    return (f"{self.config.get('name', '?')!r} step {self.step}: mlp_kind={m.mlp_kind}, "
            f"d_model={m.d_model}, mlp_dim={m.mlp_dim}, n_layers={m.n_layers}{extra}")

  @functools.cached_property
  def root(self) -> "Saved":
    """The pretraining run at the end of the init_from chain (this run if it has none); the
    chain is read once per Saved."""
    saved, seen = self, set()
    while saved.config.get("init_from"):
      if saved.workdir in seen:
        raise CheckpointError(f"init_from chain loops at {saved.workdir}")
      seen.add(saved.workdir)
      saved = load_saved(saved.config.init_from)
    return saved


def load_saved(workdir: str, step: int | None = None, *, mode: str = "") -> Saved:
  """The saved config of `workdir`'s checkpoint; CheckpointError saying what is there if none.
  `mode`: the mode reading its own --workdir (eval, sample, export), told to train that run
  first when it has no checkpoint; without it `workdir` is a source (init_from, a teacher)."""
  if not workdir:
    raise CheckpointError("no checkpoint workdir given (config.init_from is empty)")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if mode and not _has_checkpoint(ckpt_dir):
    found = sorted(os.listdir(workdir))[:12] if os.path.isdir(workdir) else "nothing (no such dir)"
    raise CheckpointError(f"--workdir {workdir} holds no checkpoint (found: {found}): "
                          f"--mode={mode} reads a trained run; run --mode=specialize (or "
                          "--mode=pretrain) with this --workdir first, or pass the --workdir of "
                          "a run that has finished one")
  if not os.path.isdir(ckpt_dir):
    found = sorted(os.listdir(workdir))[:12] if os.path.isdir(workdir) else "nothing (no such dir)"
    raise CheckpointError(f"{workdir!r} holds no checkpoints/ directory (found: {found}); "
                          "point it at a pretraining --workdir")
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.resolve_step(step)
    raw = ckpt.saved_config(step)
  except CheckpointError:
    raise
  except Exception as e:  # orbax: assorted errors for unreadable items
    raise ckpt.unreadable_config(step, e) from e
  finally:
    ckpt.close()
  config = ml_collections.ConfigDict(raw)
  kind = config.get("model", {}).get("mlp_kind") if "model" in config else None
  if kind not in MLP_KINDS:
    raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} has a config without a known "
                          f"model.mlp_kind (found {kind!r}); not a pn-jax model checkpoint")
  return Saved(workdir=os.path.abspath(workdir), config=config, step=step)


def _has_checkpoint(ckpt_dir: str) -> bool:
  """Whether `ckpt_dir` holds a complete step (orbax's temporary directories do not count)."""
  return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))


def load_result(workdir: str, *, mode: str = "") -> Saved:
  """The checkpoint that is `workdir`'s model, for eval, sample and export: a finished
  specialization's best step (specialize.json's best_step: the model whose test perplexity it
  reports, not the later steps early stopping ran past), else the latest checkpoint (with a
  warning for a specialization that has not finished). `mode`: as in load_saved."""
  path = os.path.join(workdir, RESULT)
  if not os.path.exists(path):
    saved = load_saved(workdir, mode=mode)
    if saved.config.get("init_from") and not os.path.exists(os.path.join(workdir, PRUNE_RESULT)):
      logging.warning("%s has no %s (its specialization has not finished): using its latest "
                      "checkpoint, step %d", workdir, RESULT, saved.step)
    return saved
  try:
    with open(path) as f:
      best = int(json.load(f)["best_step"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); rerun the "
                          "specialization to rewrite it") from e
  try:
    return dataclasses.replace(load_saved(workdir, best, mode=mode),
                               chosen=f"best_step of {RESULT}")
  except MissingStep as e:
    raise CheckpointError(f"{path} reports best step {best}, the model it measured, but "
                          f"{workdir} no longer keeps it (checkpoints {e.steps}); rerun the "
                          "specialization in a fresh --workdir") from e


def restore_params(saved: Saved, mesh, rules, step: int | None = None):
  """Params only, onto the current mesh (shapes checked against the saved model config)."""
  model = build_model(saved.model)
  abstract, _ = state_shardings(model, optax.identity(), mesh, rules)
  ckpt = Checkpointer(saved.workdir, read_only=True)
  try:
    return ckpt.restore_params(abstract.params, step=saved.step if step is None else step)
  finally:
    ckpt.close()


def root_run(workdir: str) -> Saved:
  """Follows init_from back from `workdir`'s latest checkpoint to the pretraining run (the one
  without init_from)."""
  return load_saved(workdir).root


# Data settings a later stage must share with the pretraining run (same tokens, same clusters).
PRETRAINING_DATA_KEYS = ("corpus", "data_dir", "tokenizer", "seq_len", "cluster_embedding")


def inherit_data(config: ml_collections.ConfigDict, pretraining: Saved) -> None:
  """Copies the pretraining run's data settings into `config` (a mutable config)."""
  for key in PRETRAINING_DATA_KEYS:
    config.data[key] = pretraining.config.data[key]


def pretraining_run_data(saved: Saved) -> pipeline.RunData:
  """The tokenizer and clusters of `saved`'s pretraining run, loaded from that run's workdir.

  Nothing is built, and the packed generic training set is not read (specialization and
  evaluation never train on it); tokenized domain splits are cached in the pretraining config's
  data.cache_dir, shared by every cell of an experiment.
  """
  return pipeline.load_run_data(saved.root.config, saved.root.workdir)
