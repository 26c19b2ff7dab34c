"""The eval mode: held-out perplexity of a run's checkpoint, generic or per domain.

The model is the run's result (saved_run.load_result: a finished specialization's best step,
else the latest checkpoint), built from that checkpoint's saved config, and the data
(tokenizer, clusters) come from the pretraining run at the root of its init_from chain, so the
same command evaluates a pretraining run, a specialized small model or a distilled one.
data.domain: "" = generic validation split, a name = that domain's test split, "all" = every
domain's test split plus their macro average (the paper's metric: mean per-token NLL per domain,
averaged over domains, then exp).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from pn_jax import saved_run
from pn_jax.config import small_model_config
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.run import Run, open_run, unlocked
from pn_jax.specialize.project import project
from pn_jax.train import loop
from pn_jax.train.step import make_eval_step


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """The caller's eval settings (batch, eval_batches, domain, mesh) on the model of `workdir`'s
  checkpoint (saved_run.load_result's: a finished specialization's best step, else the latest;
  or `step`) and the data of its pretraining run."""
  saved = (saved_run.load_saved(workdir, step, mode="eval") if step
           else saved_run.load_result(workdir, mode="eval"))
  domain = config.data.domain
  run = open_run(_eval_settings(config, saved), workdir, init_from=saved,
                 domain="" if domain == "all" else domain)
  with mesh_lib.activate(run.mesh, run.rules):
    params = saved_run.restore_params(saved, run.mesh, run.rules)
    eval_step = jax.jit(make_eval_step(run.model, logits_chunk=run.config.model.logits_chunk))
    if not domain:
      return {"step": saved.step, "split": "validation",
              **loop.heldout_loss(run, eval_step, params, split="validation")}
    on_domain = _domain_evaluator(run, params, eval_step)
    if domain != "all":
      return {"step": saved.step, "split": "test", **on_domain(domain)}
    out = {"step": saved.step, "split": "test"}
    losses = []
    for name in corpus_lib.list_domains(run.data.root):
      res = on_domain(name)
      out[f"{name}_perplexity"] = res["perplexity"]
      losses.append(res["loss"])
    out["macro_perplexity"] = float(np.exp(np.mean(losses)))
    return out


def _eval_settings(config, saved: saved_run.Saved) -> ml_collections.ConfigDict:
  """Independent experts read their generic eval batches stratified (their row layout is their
  routing); on a domain, the domain cluster's expert is projected (see `_domain_evaluator`)."""
  config = unlocked(config)
  if saved.model.get("independent_experts", False):
    config.data.cluster_batching = "stratified"
  return config


def _domain_evaluator(run: Run, params, eval_step):
  """domain name -> test-split loss / perplexity. Independent experts are evaluated as the
  domain's cluster's expert, projected to its dense model: what a PN does, whose domain batches
  are all routed to that cluster (pipeline.domain_cluster)."""
  if not run.config.model.get("independent_experts", False):
    return lambda name: loop.heldout_loss(run, eval_step, params, split="test", domain=name)
  small = build_model(small_model_config(run.config.model))
  small_step = jax.jit(make_eval_step(small, logits_chunk=run.config.model.logits_chunk))

  def on_domain(name: str) -> dict:
    p, _ = project(params, run.config.model, pipeline.domain_cluster(run.data, name))
    return loop.heldout_loss(run, small_step, p, split="test", domain=name)

  return on_domain
