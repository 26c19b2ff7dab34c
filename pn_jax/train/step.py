"""jit-able train and eval steps: pure functions of (state, batch).

The steps take their settings as arguments, not the config, so a caller (pn_jax/train/compile.py
builds them from a config in `step_options`) can see and vary what a step depends on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pn_jax.train.basis_moments import apply_updates
from pn_jax.train.loss import cross_entropy
from pn_jax.train.optimizer import global_norm
from pn_jax.train.state import TrainState


def loss_fn(params, batch, *, model, one_cluster: bool, logits_chunk: int,
            distill_temperature: float | None = None, distill_weight: float | None = None):
  """The training objective and the (sum, count) pieces of the mean masked next-token loss.

  A batch with "teacher_logprobs" (pn_jax/specialize/distill.py attaches them) trains on the
  distillation loss, which needs `distill_temperature` and `distill_weight`."""
  hidden, unembed = model.apply({"params": params}, batch["inputs"], batch["cluster"],
                                one_cluster=one_cluster, return_hidden=True)
  if unembed.ndim == 3:  # independent experts: hidden [k, b, T, D], unembed [k, D, V]
    return expert_losses(hidden, unembed, batch, logits_chunk=logits_chunk)
  total, count = cross_entropy(hidden, unembed, batch["targets"], batch["mask"],
                               chunk=logits_chunk)
  loss = total / jnp.maximum(count, 1.0)
  if "teacher_logprobs" in batch:  # SLM-d
    if distill_temperature is None or distill_weight is None:
      raise ValueError("a batch with teacher_logprobs needs distill_temperature and "
                       "distill_weight")
    loss = distill_loss(loss, hidden, unembed, batch, temperature=distill_temperature,
                        weight=distill_weight)
  return loss, (total, count)


def expert_losses(hidden_kbTD, unembed_kDV, batch, *, logits_chunk: int):
  """Sum over experts of each expert's own mean token loss: expert c's gradient is that of an
  independent run on its b rows (a token-weighted mean would scale it by its token share)."""
  k, b = hidden_kbTD.shape[:2]
  per_expert = lambda a: a.reshape(k, b, *a.shape[1:])
  xent = functools.partial(cross_entropy, chunk=logits_chunk)
  total_k, count_k = jax.vmap(xent)(hidden_kbTD, unembed_kDV, per_expert(batch["targets"]),
                                    per_expert(batch["mask"]))
  loss = jnp.sum(total_k / jnp.maximum(count_k, 1.0))
  return loss, (jnp.sum(total_k), jnp.sum(count_k))


def distill_loss(lm_loss, hidden_BTD, unembed_DV, batch, *, temperature: float, weight: float):
  """(1 - w) * LM loss + w * tau^2 * KL(teacher_tau || student_tau), per target token (Hinton)."""
  tau, w = temperature, weight
  logits_BTV = jnp.einsum("BTD,DV->BTV", hidden_BTD, unembed_DV).astype(jnp.float32)
  student_BTV = jax.nn.log_softmax(logits_BTV / tau, axis=-1)
  teacher_BTV = batch["teacher_logprobs"].astype(jnp.float32)
  kl_BT = jnp.sum(jnp.exp(teacher_BTV) * (teacher_BTV - student_BTV), axis=-1)
  mask_BT = batch["mask"].astype(jnp.float32)
  kl = jnp.sum(kl_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  return (1.0 - w) * lm_loss + w * tau * tau * kl


def make_train_step(model, tx, schedule, *, one_cluster: bool, logits_chunk: int,
                    independent_experts: bool = False, distill_temperature: float | None = None,
                    distill_weight: float | None = None):
  """-> train_step(state, batch) -> (state, metrics).

  one_cluster: every row of a batch is of one cluster (homogeneous batches, docs/data.md), so
  the PN forms each layer's expert weights once per step instead of once per sequence.
  independent_experts: the model is k independent experts (pn_jax/model/independent_experts.py), whose
  objective is a sum of per-expert means; the reported loss is still the token-weighted mean."""
  objective = functools.partial(loss_fn, model=model, one_cluster=one_cluster,
                                logits_chunk=logits_chunk, distill_temperature=distill_temperature,
                                distill_weight=distill_weight)

  def train_step(state: TrainState, batch):
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (total, count)), grads = grad_fn(state.params, batch)
    if independent_experts:
      loss = total / jnp.maximum(count, 1.0)  # report the token-weighted mean, as other models
    with jax.named_scope("optimizer"):  # names the update's kernels in profiles (pn_jax.bench)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = apply_updates(state.params, updates, state.step)
    grad_norm = global_norm(grads)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": count,
        "nonfinite": jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm)),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, *, logits_chunk: int):
  """-> eval_step(params, batch) -> {"loss_sum", "tokens"}."""

  def eval_step(params, batch):
    # Eval batches may mix clusters: the per-sequence path is exact for any batch.
    _, (total, count) = loss_fn(params, batch, model=model, one_cluster=False,
                                logits_chunk=logits_chunk)
    return {"loss_sum": total, "tokens": count}

  return eval_step
