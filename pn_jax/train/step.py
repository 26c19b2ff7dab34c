"""jit-able train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pn_jax.train.loss import cross_entropy
from pn_jax.train.state import TrainState


def loss_fn(params, batch, *, model, config: ml_collections.ConfigDict, one_cluster: bool):
  """The training objective and the (sum, count) pieces of the mean masked next-token loss."""
  hidden, unembed = model.apply({"params": params}, batch["inputs"], batch["cluster"],
                                one_cluster=one_cluster, return_hidden=True)
  if unembed.ndim == 3:  # independent experts: hidden [k, b, T, D], unembed [k, D, V]
    return expert_losses(hidden, unembed, batch, config)
  total, count = cross_entropy(hidden, unembed, batch["targets"], batch["mask"],
                               chunk=config.model.logits_chunk)
  loss = total / jnp.maximum(count, 1.0)
  if "teacher_logprobs" in batch:  # SLM-d (pn_jax/specialize/distill.py attaches the targets)
    loss = distill_loss(loss, hidden, unembed, batch, config)
  return loss, (total, count)


def expert_losses(hidden_kbTD, unembed_kDV, batch, config: ml_collections.ConfigDict):
  """Sum over experts of each expert's own mean token loss: expert c's gradient is that of an
  independent run on its b rows (a token-weighted mean would scale it by its token share)."""
  k, b = hidden_kbTD.shape[:2]
  per_expert = lambda a: a.reshape(k, b, *a.shape[1:])
  xent = functools.partial(cross_entropy, chunk=config.model.logits_chunk)
  total_k, count_k = jax.vmap(xent)(hidden_kbTD, unembed_kDV, per_expert(batch["targets"]),
                                    per_expert(batch["mask"]))
  loss = jnp.sum(total_k / jnp.maximum(count_k, 1.0))
  return loss, (jnp.sum(total_k), jnp.sum(count_k))


def distill_loss(lm_loss, hidden_BTD, unembed_DV, batch, config: ml_collections.ConfigDict):
  """(1 - w) * LM loss + w * tau^2 * KL(teacher_tau || student_tau), per target token (Hinton)."""
  tau, w = config.distill.temperature, config.distill.weight
  logits_BTV = jnp.einsum("BTD,DV->BTV", hidden_BTD, unembed_DV).astype(jnp.float32)
  student_BTV = jax.nn.log_softmax(logits_BTV / tau, axis=-1)
  teacher_BTV = batch["teacher_logprobs"].astype(jnp.float32)
  kl_BT = jnp.sum(jnp.exp(teacher_BTV) * (teacher_BTV - student_BTV), axis=-1)
  mask_BT = batch["mask"].astype(jnp.float32)
  kl = jnp.sum(kl_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  return (1.0 - w) * lm_loss + w * tau * tau * kl


def make_train_step(model, tx, schedule, config: ml_collections.ConfigDict):
  # Homogeneous batches (one cluster per step, see docs/data.md) let the PN form each layer's
  # expert weights once per step instead of once per sequence.
  one_cluster = config.data.cluster_batching == "homogeneous"

  def train_step(state: TrainState, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (total, count)), grads = grad_fn(state.params, batch, model=model, config=config,
                                            one_cluster=one_cluster)
    if config.model.get("independent_experts", False):
      loss = total / jnp.maximum(count, 1.0)  # report the token-weighted mean, as other models
    with jax.named_scope("optimizer"):  # names the update's kernels in profiles (pn_jax.bench)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": count,
        "nonfinite": jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm)),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, config: ml_collections.ConfigDict):
  def eval_step(params, batch):
    # Eval batches may mix clusters: the per-sequence path is exact for any batch.
    _, (total, count) = loss_fn(params, batch, model=model, config=config, one_cluster=False)
    return {"loss_sum": total, "tokens": count}

  return eval_step
