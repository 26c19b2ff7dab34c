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
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import ml_collections
from absl import logging

from pn_jax import workdir_lock
from pn_jax.config import ConfigError, routed, small_model_config, validate
from pn_jax.data import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.specialize import checkpoints, select, source_paths
from pn_jax.specialize.distill import TeacherIterator
from pn_jax.specialize.project import project
from pn_jax.train import flops as flops_lib
from pn_jax.train import loop
from pn_jax.train.checkpoint import CheckpointError, MissingStep
from pn_jax.train.step import make_eval_step

SUMMARY = "specialize.json"


def unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A mutable copy (the CLI locks the config; modes fill in keys from the checkpoint)."""
  return ml_collections.ConfigDict(config.to_dict())


def check_domain(run_data: pipeline.RunData, domain: str) -> None:
  domains = corpus_lib.list_domains(run_data.root)
  if domain not in domains:
    raise DataError(f"config.data.domain={domain!r} is not a domain of corpus {run_data.root!r}; "
                    f"available: {domains}")


def finetune_config(config, pre: checkpoints.Saved) -> ml_collections.ConfigDict:
  """The run's config: the small model's architecture and the pretraining run's data settings."""
  config = unlocked(config)
  config.model = small_model_config(pre.model) if routed(pre.model) else pre.model
  checkpoints.inherit_data(config, pre)
  root = checkpoints.root_run(pre.workdir)
  config.data.tokenizer_path = (root.config.data.tokenizer_path or
                                os.path.join(root.workdir, "tokenizer.model"))
  config.init_from = pre.workdir
  t = config.train
  if t.early_stop_patience:
    # Keep every checkpoint an early stop could still come back to, and one per eval.
    t.checkpoint_every = t.eval_every
    t.keep_checkpoints = max(t.keep_checkpoints, t.early_stop_patience + 2)
  return config


def _check_inputs(config) -> None:
  if not config.get("init_from"):
    raise ConfigError("config.init_from: specialize needs the pretraining run's workdir "
                      "(--config.init_from=runs/pn)")
  if not config.data.domain or config.data.domain == "all":
    raise ConfigError("config.data.domain: specialize needs one domain name, got "
                      f"{config.data.domain!r}")


def _kind(model_cfg) -> str:
  return "independent" if model_cfg.get("independent_experts", False) else model_cfg.mlp_kind


def _pick_expert(config, pre, pre_params, run_data, mesh, rules) -> tuple[int, dict]:
  domain, budget = config.data.domain, config.data.domain_tokens or None
  hist = select.domain_histogram(run_data, domain, budget)
  info = {"domain_histogram": [round(float(x), 4) for x in hist]}
  if config.specialize.select == "frequent":
    return int(hist.argmax()), info
  pre_cfg = unlocked(config)
  expert_params = None
  if pre.model.get("independent_experts", False):  # each expert scored as its dense model
    pre_cfg.model = small_model_config(pre.model)
    expert_params = lambda c: project(pre_params, pre.model, c)[0]
  else:
    pre_cfg.model = pre.model
  eval_step = jax.jit(make_eval_step(build_model(pre_cfg.model), pre_cfg))
  losses = select.expert_losses(pre_cfg, run_data, eval_step, pre_params, mesh, domain,
                                pre.model.k, budget, config.specialize.select_batches,
                                expert_params=expert_params)
  info["expert_losses"] = [round(float(x), 4) for x in losses]
  return int(losses.argmin()), info


def specialize(config: ml_collections.ConfigDict, workdir: str, *,
               allow_config_change: bool = False) -> dict:
  """Every check (inputs, paths, init_from's checkpoint, the config) runs before the workdir
  lock, which is what first creates the workdir: a refused run leaves nothing behind."""
  _check_inputs(config)
  source_paths.check_apart(workdir, {"config.init_from": config.init_from,
                                     "config.distill.teacher": config.distill.teacher})
  t0 = time.perf_counter()
  pre = _load_init(config)
  expect = config.specialize.expect_kind
  if expect and _kind(pre.model) != expect:  # independent experts are not "dense"
    raise CheckpointError(f"config.init_from={config.init_from!r} holds {pre.describe()}, but "
                          f"config.specialize.expect_kind={expect!r}")
  run_data = checkpoints.pretraining_run_data(pre.workdir)
  source_paths.check_apart(workdir, {"the pretraining run of config.init_from": run_data.workdir})
  check_domain(run_data, config.data.domain)
  config = finetune_config(config, pre)
  validate(config, device_count=jax.device_count())
  with workdir_lock.hold(workdir, "specialize"):
    return _fine_tune(config, workdir, pre, run_data, t0, allow_config_change)


def _fine_tune(config, workdir: str, pre: checkpoints.Saved, run_data: pipeline.RunData,
               t0: float, allow_config_change: bool) -> dict:
  """specialize, once checked and holding the workdir lock."""
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.logical_rules(config)
  run = loop.Run(config, workdir, mesh, rules, build_model(config.model), run_data)
  budget = config.data.domain_tokens or None
  summary = {"domain": config.data.domain, "init_from": pre.workdir, "init_step": pre.step,
             "pretrained_kind": _kind(pre.model), "domain_tokens": budget or "all"}

  with mesh_lib.activate(mesh, rules):
    pre_params = checkpoints.restore_params(pre, mesh, rules)
    if not routed(pre.model):
      params = pre_params
    else:
      cluster, info = _pick_expert(config, pre, pre_params, run_data, mesh, rules)
      params, _ = project(pre_params, pre.model, cluster)
      summary.update(cluster=cluster, select=config.specialize.select, **info)
    del pre_params
    eval_step = jax.jit(make_eval_step(run.model, config))
    before = {s: loop.evaluate(run, eval_step, params, split=s) for s in ("validation", "test")}
    summary.update(noft_valid_loss=before["validation"]["loss"],
                   noft_test_ppl=before["test"]["perplexity"])

    train_iter = pipeline.domain_iterator(config, run_data, config.data.domain, "train",
                                          max_tokens=budget, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    teacher_flops = 0.0
    if config.distill.teacher:
      train_iter, teacher_flops = _with_teacher(config, train_iter, mesh, rules)
      summary["teacher"] = config.distill.teacher
    fit_t0 = time.perf_counter()
    result = loop.fit(run, train_iter, init_params=params, eval_split="validation",
                      desc="specialize", allow_config_change=allow_config_change)
    fit_seconds = time.perf_counter() - fit_t0
    stop_reason = result.get("stop_reason") or "step_cap"
    if stop_reason not in ("early_stopping", "step_cap"):
      logging.warning("specialization stopped (%s) at step %d: not a result; rerun the same "
                      "command to resume", stop_reason, result["step"])
      return result  # preempted or time-boxed: no best-step restore, test eval or summary
    best_step = int(result.get("best_step") or result["step"])
    params = checkpoints.restore_params(checkpoints.Saved(workdir, config, best_step), mesh,
                                        rules)
    test = loop.evaluate(run, eval_step, params, split="test")

  steps = int(result["step"])
  step_flops = flops_lib.train_flops_per_step(config.model, config.data.batch_size,
                                              config.data.seq_len)
  summary.update(
      steps=steps, stop_reason=stop_reason, hit_step_cap=stop_reason == "step_cap",
      best_step=best_step, best_valid_loss=result.get("best_eval_loss"),
      test_loss=test["loss"], test_ppl=test["perplexity"], test_tokens=test["tokens"],
      train_domain_tokens=pipeline.packed_split(run_data, "train", config.data.domain,
                                                budget).num_targets,
      specialize_flops=steps * (step_flops + teacher_flops), fit_seconds=fit_seconds,
      wall_seconds=time.perf_counter() - t0)
  _write_outputs(workdir, run_data, summary)
  logging.info("specialized %s on %s: test ppl %.3f (no fine-tuning %.3f)", pre.describe(),
               config.data.domain, test["perplexity"], before["test"]["perplexity"])
  return summary


def _load_init(config) -> checkpoints.Saved:
  """init_from's checkpoint at config.init_step (0: the latest)."""
  try:
    return checkpoints.load_saved(config.init_from, config.init_step or None)
  except MissingStep as e:
    raise CheckpointError(f"config.init_step={config.init_step}: {e}; pick one of those steps, "
                          "or 0 for the latest") from e


def _with_teacher(config, train_iter, mesh, rules):
  """Wraps the domain iterator with the teacher's soft targets; -> (iterator, teacher FLOPs
  per step)."""
  teacher = checkpoints.load_saved(config.distill.teacher)
  if teacher.model.vocab_size != config.model.vocab_size:
    raise CheckpointError(f"teacher {teacher.describe()} has vocab_size "
                          f"{teacher.model.vocab_size}, the student {config.model.vocab_size}")
  params = checkpoints.restore_params(teacher, mesh, rules)
  it = TeacherIterator(train_iter, build_model(teacher.model), params,
                       config.distill.temperature, mesh)
  # A forward pass is a third of a training step's 6N FLOPs per token.
  fwd = flops_lib.train_flops_per_step(teacher.model, config.data.batch_size,
                                       config.data.seq_len) / 3
  return it, fwd


def _write_outputs(workdir: str, run_data: pipeline.RunData, summary: dict) -> None:
  if jax.process_index() != 0:
    return
  tok = run_data.tokenizer
  if tok.kind != "byte" and os.path.exists(tok.path):
    shutil.copyfile(tok.path, os.path.join(workdir, "tokenizer.model"))
  corpus_lib.write_json(os.path.join(workdir, SUMMARY), summary)  # atomic: it marks "done"
