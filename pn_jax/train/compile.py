"""The jitted train and eval steps of a model on a mesh: one recipe for the training loop
(pn_jax/train/loop.py) and the benchmark (pn_jax/bench.py), so the bench times the step that
training runs (same shardings, same buffer donation)."""

from __future__ import annotations

import jax
from absl import logging
import ml_collections

from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train.step import make_eval_step, make_train_step


def step_options(config: ml_collections.ConfigDict) -> dict:
  """The settings of a config that the steps depend on: keyword arguments of `compile_steps`
  (and of step.make_train_step)."""
  distill = config.get("distill")  # (absent in configs saved before distillation existed)
  return dict(
      # Homogeneous batches (one cluster per step, see docs/data.md) let the PN form each
      # layer's expert weights once per step instead of once per sequence.
      one_cluster=config.data.cluster_batching == "homogeneous",
      logits_chunk=config.model.logits_chunk,
      independent_experts=bool(config.model.get("independent_experts", False)),
      distill_temperature=distill.temperature if distill else None,
      distill_weight=distill.weight if distill else None)


def compile_steps(model, tx, schedule, mesh: jax.sharding.Mesh, shardings, *, one_cluster: bool,
                  logits_chunk: int, independent_experts: bool = False,
                  distill_temperature: float | None = None, distill_weight: float | None = None):
  """-> (train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> sums), jitted
  with the state's `shardings` (pn_jax.train.state), batches split over the data axes, metrics
  replicated. train_step donates the state it is given: use the state it returns."""
  warn_grouped_on_gpu(model.cfg)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  train_step = jax.jit(
      make_train_step(model, tx, schedule, one_cluster=one_cluster, logits_chunk=logits_chunk,
                      independent_experts=independent_experts,
                      distill_temperature=distill_temperature, distill_weight=distill_weight),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, logits_chunk=logits_chunk),
                      in_shardings=(shardings.params, batch_sharding), out_shardings=replicated)
  return train_step, eval_step


def warn_grouped_on_gpu(model_cfg) -> None:
  """model.mixed_mlp="grouped" on GPU: jax.lax.ragged_dot is lowered there as a dense masked
  product (jax 0.11); measured on an H200 ~23x slower than per_sequence for one MLP matrix, and
  the GPT-2-small PN bench step asks for 110 GiB (docs/benchmarks.md). Say so before compiling
  (the eval step runs mixed batches even when training batches are one cluster each)."""
  if (model_cfg.mlp_kind != "dense" and model_cfg.mixed_mlp == "grouped"
      and jax.default_backend() == "gpu"):
    logging.warning("model.mixed_mlp=grouped on GPU: jax.lax.ragged_dot runs as a dense masked "
                    "product here (measured ~23x slower per MLP matrix than per_sequence, and "
                    "out of memory for the GPT-2-small PN bench on a 141 GB H200; "
                    "docs/benchmarks.md); set model.mixed_mlp=per_sequence")
