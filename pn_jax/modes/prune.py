"""The prune mode (SLM-prune): a dense checkpoint (the LLM) -> a smaller dense model, pruned and
repaired on generic calibration batches without training (pn_jax/specialize/structured_pruning.py).

    python -m pn_jax.main --mode=prune --config=configs/prune.py --config.init_from=runs/llm \
        --workdir=runs/llm_pruned

The workdir is a run that specialize, eval, sample and export read like a dense pretraining
run: one checkpoint at init_from's step (the pruned params, a fresh optimizer state and a saved
config whose `model` is the pruned shape and whose init_from is the source, so the tokenizer and
clusters stay the source's pretraining run's), a copy of the tokenizer, and prune.json (written
last: it marks the run done) with the shape, what was kept, the calibration losses of the
source, the sliced model, the norm-matched one and the repaired one, the generic validation
perplexity, and the stage's seconds and FLOPs (its cost on top of the source's pretraining).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from pn_jax import saved_run, workdir_lock
from pn_jax.config import ConfigError
from pn_jax.data import batches
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.model.model_config import ModelConfig
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.run import Run, open_run, unlocked
from pn_jax.specialize import structured_pruning as prune_lib
from pn_jax.specialize import source_paths
from pn_jax.train import flops as flops_lib
from pn_jax.train import loop
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import create_state
from pn_jax.train.step import make_eval_step

RESULT = saved_run.PRUNE_RESULT
# The settings a finished pruning is identified by: rerunning with the same ones returns it.
_SETTINGS = ("d_model", "mlp_dim", "calibration_batches", "ridge", "repair")


def prune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Every check runs before the workdir lock, which is what first creates the workdir."""
  if not config.get("init_from"):
    raise ConfigError("config.init_from: prune needs the dense run to prune (e.g. "
                      "--config.init_from=runs/llm)")
  if jax.process_count() > 1:
    raise ConfigError("prune runs in one process (it fits a small model on one accelerator); "
                      f"this job has {jax.process_count()}")
  source_paths.check_apart(workdir, {"config.init_from": config.init_from})
  source = saved_run.load_saved(config.init_from, config.init_step or None)
  shape = prune_lib.pruned_shape(ModelConfig.from_config(source.model), config.prune.d_model,
                                 config.prune.mlp_dim)
  settings = {"source": source.workdir, "source_step": source.step,
              **{k: config.prune[k] for k in _SETTINGS}}
  done = _finished(workdir, settings)
  if done is not None:
    logging.info("%s already holds this pruning of %s (%s): not redone", workdir,
                 source.describe(), RESULT)
    return done
  _check_unfinished(workdir, settings)
  small = ml_collections.ConfigDict(source.model.to_dict())
  small.update(d_model=shape.d_model, n_heads=shape.n_heads, mlp_dim=shape.mlp_dim)
  run = open_run(_settings(config, source), workdir, init_from=source, model=small)
  with workdir_lock.hold(workdir, "prune"):
    return _prune_locked(run, shape, settings)


def _settings(config, source: saved_run.Saved) -> ml_collections.ConfigDict:
  """The pruned run's config: it records the source and the step pruned."""
  config = unlocked(config)
  config.init_from, config.init_step = source.workdir, source.step
  return config


def _finished(workdir: str, settings: dict) -> dict | None:
  """prune.json of an earlier pruning with these settings; ConfigError for other settings (a
  fresh --workdir keeps both)."""
  path = os.path.join(workdir, RESULT)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      done = json.load(f)
    recorded = {k: done["settings"][k] for k in settings}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}); move it aside to prune "
                      "into this --workdir again") from e
  if recorded != settings:
    diff = ", ".join(f"{k}: {recorded[k]!r} -> {v!r}" for k, v in settings.items()
                     if recorded[k] != v)
    raise ConfigError(f"--workdir {workdir} holds a pruning with other settings ({diff}); use a "
                      "fresh --workdir for this one")
  return done


def _check_unfinished(workdir: str, settings: dict) -> None:
  """A workdir with checkpoints but no prune.json: the same pruning cut short after its save
  (redone: `_save` writes its checkpoint again, under the lock), or another run's, which is
  refused, never overwritten."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    return
  try:
    saved = saved_run.load_saved(workdir)
    same = (saved.config.get("init_from") == settings["source"]
            and saved.step == settings["source_step"]
            and all(saved.config.get("prune", {}).get(k) == settings[k] for k in _SETTINGS))
  except CheckpointError:
    same = False
  if not same:
    raise ConfigError(f"--workdir {workdir} holds checkpoints that are not this pruning's (of "
                      f"{settings['source']} step {settings['source_step']}); prune into a "
                      "fresh --workdir")
  logging.info("%s holds this pruning's checkpoint without %s (cut short): pruning again",
               workdir, RESULT)


def calibration_batches(run: Run) -> list[dict]:
  """prune.calibration_batches batches of the source pretraining run's generic training set
  (its prepared packed set, mixed clusters, shuffled with config.seed)."""
  c = run.config
  data = dataclasses.replace(run.data, train_set=pipeline.prepared_train_set(run.data))
  it = batches.train_batches(data, batch_size=c.data.batch_size, mode="mixed", seed=c.seed)
  return [next(it) for _ in range(c.prune.calibration_batches)]


def _prune_locked(run: Run, shape: prune_lib.Shape, settings: dict) -> dict:
  t0 = time.perf_counter()
  config, source = run.config, run.source
  big, small_cfg = ModelConfig.from_config(source.model), ModelConfig.from_config(config.model)
  cal = calibration_batches(run)
  tokens = [np.asarray(b["inputs"]) for b in cal]
  with mesh_lib.activate(run.mesh, run.rules):
    params = jax.device_get(saved_run.restore_params(source, run.mesh, run.rules))
    scores = prune_lib.importance(params, tokens, big)
    keep = prune_lib.choose(scores, shape)
    sliced = prune_lib.slice_params(params, keep)
    normed = prune_lib.repair(params, sliced, keep, tokens, big, solve=False)
    pruned = (prune_lib.repair(params, sliced, keep, tokens, big, ridge=config.prune.ridge)
              if config.prune.repair else normed)
    loss = _calibration_loss(run, cal)
    losses = {"source": loss(params, source.model), "sliced": loss(sliced, config.model),
              "norms_matched": loss(normed, config.model), "pruned": loss(pruned, config.model)}
    eval_step = jax.jit(make_eval_step(run.model, logits_chunk=config.model.logits_chunk))
    generic = loop.heldout_loss(run, eval_step, pruned, split="validation", domain="")
    _save(run, pruned, source.step)
  seconds = time.perf_counter() - t0
  n_tokens = sum(t.size for t in tokens)
  T = config.data.seq_len  # one token's forward: a third of a training step's per token
  fwd = lambda m: flops_lib.train_flops_per_step(m, 1, T) / 3 / T
  # importance: a source pass; each repair (norms only, then the refit): a source and a pruned
  # pass; the calibration losses: a source pass and three pruned ones
  repairs = 1 + bool(config.prune.repair)
  flops = n_tokens * ((2 + repairs) * fwd(source.model) + (repairs + 3) * fwd(config.model))
  summary = {
      "settings": settings, "source_model": source.describe(),
      "shape": dataclasses.asdict(shape), "n_layers": small_cfg.n_layers,
      "head_dim": small_cfg.d_model // small_cfg.n_heads,
      "kept": {"channels": keep.channels.tolist(), "heads": keep.heads.tolist(),
               "neurons_per_layer": shape.mlp_dim},
      "calibration_tokens": int(n_tokens), "calibration_loss": losses,
      "generic_valid_loss": generic["loss"], "generic_valid_ppl": generic["perplexity"],
      "params": int(sum(x.size for x in jax.tree.leaves(pruned))),
      "source_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "flops_per_token": fwd(config.model), "source_flops_per_token": fwd(source.model),
      "step": source.step, "seconds": seconds, "flops": float(flops),
      "device": jax.devices()[0].device_kind}
  _write_outputs(run, summary)
  logging.info("pruned %s to d_model %d, %d heads, MLP %d: calibration loss %.3f (source %.3f, "
               "sliced %.3f), generic valid ppl %.2f, %.1f s", source.describe(), shape.d_model,
               shape.n_heads, shape.mlp_dim, losses["pruned"], losses["source"],
               losses["sliced"], generic["perplexity"], seconds)
  return summary


def _calibration_loss(run: Run, cal: list[dict]):
  """(params, model config) -> the model's mean loss on the calibration batches (the eval
  step's, so the pruned params are checked to load into the real model)."""
  def loss(params, model_cfg) -> float:
    step = jax.jit(make_eval_step(build_model(model_cfg), logits_chunk=0))
    total, count = loop.summed_loss(step, params, cal, run.mesh)
    return total / count
  return loss


def _save(run: Run, params, step: int) -> None:
  """One complete checkpoint at `step`: the pruned params and a fresh optimizer state (a
  checkpoint left by a pruning cut short before prune.json, which _check_unfinished
  recognised as this pruning's, is replaced)."""
  shutil.rmtree(os.path.join(run.workdir, "checkpoints"), ignore_errors=True)
  tx, _ = make_optimizer(run.config)
  state, _ = create_state(run.model, tx, run.mesh, run.rules, jax.random.key(run.config.seed),
                          params=params)
  ckpt = Checkpointer(run.workdir, keep=1, async_save=False)
  try:
    ckpt.save(step, state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)), run.config,
              force=True)
    ckpt.wait()
  finally:
    ckpt.close()


def _write_outputs(run: Run, summary: dict) -> None:
  tok = run.data.tokenizer
  if tok.kind != "byte" and os.path.exists(tok.path):
    shutil.copyfile(tok.path, os.path.join(run.workdir, "tokenizer.model"))
  corpus_lib.write_json(os.path.join(run.workdir, RESULT), summary)  # atomic: it marks "done"
