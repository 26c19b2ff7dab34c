"""The eval mode: held-out perplexity of a run's checkpoint, generic or per domain.

The model comes from the checkpoint's saved config and the data (tokenizer, clusters) from the
pretraining run at the root of its init_from chain, so the same command evaluates a pretraining
run, a specialized small model or a distilled one. data.domain: "" = generic validation split,
a name = that domain's test split, "all" = every domain's test split plus their macro average
(the paper's metric: mean per-token NLL per domain, averaged over domains, then exp).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from pn_jax.config import small_model_config, validate
from pn_jax.data import corpus as corpus_lib
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.specialize import checkpoints
from pn_jax.specialize.finetune import check_domain, unlocked
from pn_jax.specialize.project import project
from pn_jax.train import loop
from pn_jax.train.step import make_eval_step


def eval_config(config, saved: checkpoints.Saved) -> ml_collections.ConfigDict:
  """The caller's eval settings (batch, eval_batches, domain, mesh) on the saved model/data.

  Independent experts read their generic eval batches stratified (their row layout is their
  routing); on a domain, the domain cluster's expert is projected (see `_domain_evaluator`).
  """
  config = unlocked(config)
  config.model = saved.model
  checkpoints.inherit_data(config, checkpoints.root_run(saved.workdir))
  if saved.model.get("independent_experts", False):
    config.data.cluster_batching = "stratified"
  return config


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  saved = checkpoints.load_saved(workdir, step)
  config = eval_config(config, saved)
  validate(config, device_count=jax.device_count())
  run_data = checkpoints.pretraining_run_data(workdir)
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.logical_rules(config)
  run = loop.Run(config, workdir, mesh, rules, build_model(config.model), run_data)
  domain = config.data.domain
  with mesh_lib.activate(mesh, rules):
    params = checkpoints.restore_params(saved, mesh, rules)
    eval_step = jax.jit(make_eval_step(run.model, config))
    on_domain = _domain_evaluator(run, params, eval_step)
    if domain != "all":
      if not domain:
        return {"step": saved.step, "split": "validation",
                **loop.evaluate(run, eval_step, params, split="validation")}
      check_domain(run_data, domain)
      return {"step": saved.step, "split": "test", **on_domain(domain)}
    out = {"step": saved.step, "split": "test"}
    losses = []
    for name in corpus_lib.list_domains(run_data.root):
      res = on_domain(name)
      out[f"{name}_perplexity"] = res["perplexity"]
      losses.append(res["loss"])
    out["macro_perplexity"] = float(np.exp(np.mean(losses)))
    return out


def _domain_evaluator(run: loop.Run, params, eval_step):
  """domain name -> test-split loss / perplexity. Independent experts are evaluated as the
  domain's cluster's expert, projected to its dense model: what a PN does, whose domain batches
  are all routed to that cluster (RunData.domain_cluster)."""
  independent = run.config.model.get("independent_experts", False)
  if independent:
    small = small_model_config(run.config.model)
    model = build_model(small)
    eval_step = jax.jit(make_eval_step(model, run.config))

  def on_domain(name: str) -> dict:
    cfg = unlocked(run.config)
    cfg.data.domain = name
    domain_run = dataclasses.replace(run, config=cfg)
    p = params
    if independent:
      cfg.model = small
      domain_run = dataclasses.replace(domain_run, model=model)
      p, _ = project(params, run.config.model, run.run_data.domain_cluster(name))
    return loop.evaluate(domain_run, eval_step, p, split="test")

  return on_domain
