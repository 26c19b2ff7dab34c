"""The specialize mode: pretrained checkpoint -> (projected) small model -> fine-tuned on a domain.

PN / mixture / independent-experts (SLM-mix) checkpoints are projected onto one expert (the
domain's most frequent cluster, or the expert with the lowest loss on the domain's training set);
dense ones (SLM, LLM) are fine-tuned as they are. With config.distill.teacher set the fine-tuning
loss also matches a teacher's soft targets (SLM-d). Fine-tuning is pn_jax.train.loop.fit on the
domain's limited training set (a fixed `data.domain_tokens` prefix) with early stopping on its
validation split; the best checkpoint is kept and its held-out test perplexity reported. The
small model is a normal run: its workdir holds checkpoints (with a config whose `model` is the
small model and `init_from` the pretraining run), metrics, specialize.json and a copy of the
tokenizer.

specialize.json is the result, written only when fine-tuning ended by early stopping or at the
step cap (`stop_reason`, `hit_step_cap`): a preempted (SIGTERM/SIGINT) or time-boxed
(train.stop_at_step) run returns the fit's result and writes nothing, and rerunning the same
command resumes from the workdir's checkpoint (early-stopping state included).

The source step is part of the run's identity: the run's config records the init_from step it
resolved (config.init_step, also specialize.json's init_step), and a workdir started from
another step of init_from is refused (init_step=0 follows the source's latest checkpoint, which
moves on while its pretraining continues): resuming would fine-tune one step and report another.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections
from absl import logging

from pn_jax import saved_run, workdir_lock
from pn_jax.config import ConfigError, routed, small_model_config
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import batches
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.run import Run, open_run, unlocked
from pn_jax.specialize import select, source_paths
from pn_jax.specialize.distill import TeacherIterator
from pn_jax.specialize.project import project
from pn_jax.train import flops as flops_lib
from pn_jax.train import loop, resume_check
from pn_jax.train.checkpoint import (CheckpointError, Checkpointer, CorruptCheckpoint,
                                     MissingStep)
from pn_jax.train.step import make_eval_step

SUMMARY = saved_run.RESULT


def _check_inputs(config) -> None:
  if not config.get("init_from"):
    raise ConfigError("config.init_from: specialize needs the pretraining run's workdir "
                      "(--config.init_from=runs/pn)")
  if not config.data.domain or config.data.domain == "all":
    raise ConfigError("config.data.domain: specialize needs one domain name, got "
                      f"{config.data.domain!r}")


def _kind(model_cfg) -> str:
  return "independent" if model_cfg.get("independent_experts", False) else model_cfg.mlp_kind


def specialize(config: ml_collections.ConfigDict, workdir: str, *,
               allow_config_change: bool = False) -> dict:
  """Every check (inputs, paths, init_from's checkpoint, the config) runs before the workdir
  lock, which is what first creates the workdir: a refused run leaves nothing behind."""
  _check_inputs(config)
  source_paths.check_apart(workdir, {"config.init_from": config.init_from,
                                     "config.distill.teacher": config.distill.teacher})
  t0 = time.perf_counter()
  run = open_specialize_run(config, workdir)
  with workdir_lock.hold(workdir, "specialize"):
    return _fine_tune(run, t0, allow_config_change)


def open_specialize_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """The small model's run, checked and with nothing written: run.source is init_from's
  checkpoint (at config.init_step), run.model the dense model it turns into (one expert's shape
  for PN / mixture / independent experts), run.data its pretraining run's tokenizer/clusters."""
  pre = _load_init(config)
  expect = config.specialize.expect_kind
  if expect and _kind(pre.model) != expect:  # independent experts are not "dense"
    raise CheckpointError(f"config.init_from={config.init_from!r} holds {pre.describe()}, but "
                          f"config.specialize.expect_kind={expect!r}")
  source_paths.check_apart(workdir, {"the pretraining run of config.init_from": pre.root.workdir})
  _check_source_step(workdir, config, pre)
  model = small_model_config(pre.model) if routed(pre.model) else pre.model
  return open_run(_fine_tune_settings(config, pre), workdir, init_from=pre, model=model,
                  domain=config.data.domain)


def recorded_source_step(workdir: str) -> int | None:
  """The init_from step the specialization in `workdir` started from: specialize.json's
  init_step if it finished, else its latest checkpoint's config.init_step; None for a new workdir
  (or checkpoints saved before the resolved step was recorded, init_step 0)."""
  summary = os.path.join(workdir, SUMMARY)
  if os.path.exists(summary):
    try:
      with open(summary) as f:
        return int(json.load(f)["init_step"])
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{summary} is unreadable ({type(e).__name__}: {e}); move it aside "
                            "to rerun the specialization's final evaluation") from e
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      return None
    return int(resume_check.saved_config(ckpt, step).get("init_step", 0)) or None
  finally:
    ckpt.close()


def _check_source_step(workdir: str, config, pre: saved_run.Saved) -> None:
  """ConfigError if `workdir` holds a specialization of another step of init_from than `pre`
  (--allow_config_change does not apply: the run would mix two checkpoints of its source)."""
  recorded = recorded_source_step(workdir)
  if recorded is None or recorded == pre.step:
    return
  now = (f"config.init_step={config.init_step} asks for step {pre.step}" if config.init_step
         else f"config.init_step=0 (its latest checkpoint) is now step {pre.step}")
  done = os.path.exists(os.path.join(workdir, SUMMARY))
  ckpt = Checkpointer(pre.workdir, read_only=True)
  try:
    kept = recorded in ckpt.manager.all_steps()
  finally:
    ckpt.close()
  again = (f"pass --config.init_step={recorded} to {'rerun' if done else 'continue'} it, or "
           if kept else f"init_from no longer keeps step {recorded}; ")
  raise ConfigError(
      f"--workdir {workdir} holds a {'finished' if done else 'preempted'} specialization of "
      f"config.init_from={config.init_from} at step {recorded}, but {now}: "
      f"{'rerunning' if done else 'resuming'} it would mix the two; {again}use a fresh "
      f"--workdir to specialize step {pre.step}")


def _fine_tune_settings(config, pre: saved_run.Saved) -> ml_collections.ConfigDict:
  """A copy of `config` that records init_from and the step of it this run starts from, and
  saves at every eval, so the best eval step (the result, kept by fit's keep_best whatever
  train.keep_checkpoints and train.early_stop_patience are) is on disk."""
  config = unlocked(config)
  config.init_from = pre.workdir
  config.init_step = pre.step  # resolved: 0 (the latest) moves on with the source
  config.train.checkpoint_every = config.train.eval_every
  return config


def _domain_shares(run: Run):
  """float64 [k]: the fine-tuning set's share in each cluster (token weighted)."""
  return pipeline.domain_histogram(run.data, run.config.data.domain, rule="budget",
                                   max_tokens=run.config.data.domain_tokens or None)


def pick_expert(run: Run, params) -> tuple[int, dict]:
  """The expert of run.source (a routed checkpoint; `params` its params) that the run's domain
  gets: specialize.select='frequent' (and 'shares', which projects every expert averaged by the
  domain's cluster shares: the cluster recorded is the most frequent) takes the domain's most
  frequent cluster, 'lowest_loss' the expert with the lowest loss on the domain's training set
  (independent experts scored each as its dense model). -> (expert, what the choice was made
  from)."""
  config, pre = run.config, run.source
  domain, budget = config.data.domain, config.data.domain_tokens or None
  info = {"domain_histogram": [round(float(x), 4) for x in _domain_shares(run)]}
  if config.specialize.select in ("frequent", "shares"):
    return pipeline.domain_cluster(run.data, domain, rule="budget", max_tokens=budget), info
  expert_params, scored = None, pre.model
  if pre.model.get("independent_experts", False):  # each expert scored as its dense model
    scored = small_model_config(pre.model)
    expert_params = lambda c: project(params, pre.model, c)[0]
  eval_step = jax.jit(make_eval_step(build_model(scored), logits_chunk=scored.logits_chunk))
  losses = select.expert_losses(run.data, eval_step, params, run.mesh, domain, pre.model.k,
                                budget, config.specialize.select_batches,
                                batch_size=config.data.batch_size,
                                num_workers=config.data.get("num_workers", 0),
                                expert_params=expert_params)
  info["expert_losses"] = [round(float(x), 4) for x in losses]
  return int(losses.argmin()), info


def _fine_tune(run: Run, t0: float, allow_config_change: bool) -> dict:
  """specialize, once checked and holding the workdir lock."""
  config, pre = run.config, run.source
  summary = {"domain": config.data.domain, "init_from": pre.workdir, "init_step": pre.step,
             "pretrained_kind": _kind(pre.model),
             "domain_tokens": config.data.domain_tokens or "all"}
  with mesh_lib.activate(run.mesh, run.rules):
    params = _initial_params(run, summary)
    eval_step = jax.jit(make_eval_step(run.model, logits_chunk=config.model.logits_chunk))
    before = {s: loop.heldout_loss(run, eval_step, params, split=s)
              for s in ("validation", "test")}
    summary.update(noft_valid_loss=before["validation"]["loss"],
                   noft_test_ppl=before["test"]["perplexity"])
    train_iter, teacher_flops = _train_iterator(run, summary)
    fit_t0 = time.perf_counter()
    result = loop.fit(run, train_iter, init_params=params, eval_split="validation",
                      desc="specialize", allow_config_change=allow_config_change,
                      keep_best=True)
    fit_seconds = time.perf_counter() - fit_t0
    stop_reason = result.get("stop_reason") or "step_cap"
    if stop_reason not in ("early_stopping", "step_cap"):
      logging.warning("specialization stopped (%s) at step %d: not a result; rerun the same "
                      "command to resume", stop_reason, result["step"])
      return result  # preempted or time-boxed: no best-step restore, test eval or summary
    best_step = int(result.get("best_step") or result["step"])
    params = saved_run.restore_params(saved_run.Saved(run.workdir, config, best_step),
                                      run.mesh, run.rules)
    test = loop.heldout_loss(run, eval_step, params, split="test")
  summary.update(_outcome(run, result, test, best_step, teacher_flops),
                 fit_seconds=fit_seconds, wall_seconds=time.perf_counter() - t0)
  _write_outputs(run, summary)
  logging.info("specialized %s on %s: test ppl %.3f (no fine-tuning %.3f)", pre.describe(),
               config.data.domain, test["perplexity"], before["test"]["perplexity"])
  return summary


def _initial_params(run: Run, summary: dict):
  """The fine-tuning's start: init_from's params, projected onto the picked expert if routed
  (the choice goes into `summary`)."""
  pre = run.source
  try:
    pre_params = saved_run.restore_params(pre, run.mesh, run.rules)
  except CorruptCheckpoint as e:
    raise _corrupt_source(run.config, e) from e
  if not routed(pre.model):
    return pre_params
  cluster, info = pick_expert(run, pre_params)
  summary.update(cluster=cluster, select=run.config.specialize.select, **info)
  if run.config.specialize.select != "shares":
    return project(pre_params, pre.model, cluster)[0]
  if pre.model.get("independent_experts", False):
    raise ConfigError("specialize.select='shares' averages the experts' weights by the domain's "
                      f"cluster shares; {pre.workdir} holds independent experts (k separate "
                      "networks) that do not average: use 'frequent' or 'lowest_loss'")
  return project(pre_params, pre.model, cluster, shares=_domain_shares(run))[0]


def _train_iterator(run: Run, summary: dict):
  """The domain's limited training set (with the teacher's soft targets under distillation);
  -> (iterator, teacher FLOPs per step)."""
  config = run.config
  train_iter = batches.domain_batches(
      run.data, config.data.domain, "train", batch_size=config.data.batch_size,
      seed=config.seed, max_tokens=config.data.domain_tokens or None,
      num_workers=config.data.get("num_workers", 0),
      shard=batches.Shard(jax.process_index(), jax.process_count()))
  if not config.distill.teacher:
    return train_iter, 0.0
  summary["teacher"] = config.distill.teacher
  return _with_teacher(run, train_iter)


def _outcome(run: Run, result: dict, test: dict, best_step: int, teacher_flops: float) -> dict:
  """specialize.json's entries about the fine-tuning and its test evaluation."""
  config = run.config
  steps, stop_reason = int(result["step"]), result.get("stop_reason") or "step_cap"
  step_flops = flops_lib.train_flops_per_step(config.model, config.data.batch_size,
                                              config.data.seq_len)
  train = pipeline.packed_split(run.data, "train", config.data.domain,
                                config.data.domain_tokens or None)
  return dict(
      steps=steps, stop_reason=stop_reason, hit_step_cap=stop_reason == "step_cap",
      best_step=best_step, best_valid_loss=result.get("best_eval_loss"),
      test_loss=test["loss"], test_ppl=test["perplexity"], test_tokens=test["tokens"],
      train_domain_tokens=train.num_targets,
      specialize_flops=steps * (step_flops + teacher_flops))


def _load_init(config) -> saved_run.Saved:
  """init_from's checkpoint at config.init_step (0: the latest)."""
  try:
    return saved_run.load_saved(config.init_from, config.init_step or None)
  except MissingStep as e:
    raise CheckpointError(f"config.init_step={config.init_step}: {e}; pick one of those steps, "
                          "or 0 for the latest") from e
  except CorruptCheckpoint as e:
    raise _corrupt_source(config, e) from e


def _corrupt_source(config, e: CorruptCheckpoint) -> CheckpointError:
  """A corrupt step of init_from: the fix is another step of it (config.init_step), not moving
  files of a run this one only reads."""
  earlier = [s for s in e.others if s < e.step]
  fix = (f"pass --config.init_step=<an earlier good step> (e.g. --config.init_step={earlier[-1]};"
         f" its steps: {e.others})" if earlier else
         f"pass --config.init_step=<another step> (its steps: {e.others})" if e.others else
         "it has no other step: repair or retrain that run")
  return CheckpointError(f"config.init_from={config.init_from}: its checkpoint step {e.step} is "
                         f"corrupt or incomplete ({e.detail}); {fix}")


def _with_teacher(run: Run, train_iter):
  """Wraps the domain iterator with the teacher's soft targets; -> (iterator, teacher FLOPs
  per step)."""
  config = run.config
  teacher = saved_run.load_saved(config.distill.teacher)
  if teacher.model.vocab_size != config.model.vocab_size:
    raise CheckpointError(f"teacher {teacher.describe()} has vocab_size "
                          f"{teacher.model.vocab_size}, the student {config.model.vocab_size}")
  params = saved_run.restore_params(teacher, run.mesh, run.rules)
  it = TeacherIterator(train_iter, build_model(teacher.model), params,
                       config.distill.temperature, run.mesh)
  # A forward pass is a third of a training step's 6N FLOPs per token.
  fwd = flops_lib.train_flops_per_step(teacher.model, config.data.batch_size,
                                       config.data.seq_len) / 3
  return it, fwd


def _write_outputs(run: Run, summary: dict) -> None:
  if jax.process_index() != 0:
    return
  tok = run.data.tokenizer
  if tok.kind != "byte" and os.path.exists(tok.path):
    shutil.copyfile(tok.path, os.path.join(run.workdir, "tokenizer.model"))
  corpus_lib.write_json(os.path.join(run.workdir, SUMMARY), summary)  # atomic: it marks "done"
