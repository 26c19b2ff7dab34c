"""Turn one expert of a PN, a hard mixture or independent experts into a plain dense small model.

Evaluating the PN equation once per layer for the chosen cluster gives the dense MLP weights;
attention, embeddings and norms are copied. Independent experts (SLM-mix) are already dense
models stacked on a leading expert axis: the expert is sliced out of every leaf. The dense
model's logits equal the routed model's on that cluster's sequences (tests/test_project.py,
tests/test_experts.py check it to float tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from pn_jax.config import routed, small_model_config
from pn_jax.model.mlp import pn_weight


def expert_code(params, model_cfg: ml_collections.ConfigDict, cluster: int) -> jax.Array:
  """The code row selecting `cluster`'s expert: E[cluster] (PN) or a one-hot vector (mixture)."""
  if not 0 <= cluster < model_cfg.k:
    raise ValueError(f"cluster {cluster} is out of range for a model with k={model_cfg.k}")
  if model_cfg.mlp_kind == "projected":
    return params["E"][cluster]
  return jax.nn.one_hot(cluster, model_cfg.k, dtype=_formed_dtype(params))


def mixed_code(params, model_cfg: ml_collections.ConfigDict, shares) -> jax.Array:
  """sum_i shares[i] * code_i: E's rows (PN) or one-hot rows (mixture) averaged by a domain's
  cluster shares. W is linear in the code, so its projection is the experts' weights averaged by
  the same shares (specialize.select='shares': a domain spread over clusters gets all of them)."""
  shares = jnp.asarray(shares, jnp.float32)
  if shares.shape != (model_cfg.k,) or not bool(jnp.all(shares >= 0)) or not jnp.sum(shares) > 0:
    raise ValueError(f"cluster shares must be k={model_cfg.k} non-negative numbers, not all "
                     f"zero; got shape {shares.shape}")
  shares = shares / jnp.sum(shares)
  if model_cfg.mlp_kind == "projected":
    return shares.astype(params["E"].dtype) @ params["E"]
  return shares.astype(_formed_dtype(params))


def _formed_dtype(params):
  """The dense weights' dtype: T's, at least float32 (a bfloat16 basis, model.basis_dtype,
  forms float32 weights: the small model's params are float32)."""
  return jnp.promote_types(params["blocks"]["mlp"]["T_in"].dtype, jnp.float32)


def project(params, model_cfg: ml_collections.ConfigDict, cluster: int, shares=None):
  """PN/mixture/independent-experts params + a cluster (or, PN and mixture, cluster `shares`:
  `mixed_code`) -> (dense small params, its config)."""
  if not routed(model_cfg):
    raise ValueError("project() needs a projected, mixture or independent-experts model; this "
                     "one is already dense")
  if model_cfg.get("independent_experts", False):
    if shares is not None:
      raise ValueError("independent experts are k separate networks (attention and embeddings "
                       "too): their weights do not average into one model; pick one cluster")
    if not 0 <= cluster < model_cfg.k:
      raise ValueError(f"cluster {cluster} is out of range for a model with k={model_cfg.k}")
    return (jax.tree.map(lambda x: x[cluster], params["experts"]),
            small_model_config(model_cfg))
  code = (expert_code(params, model_cfg, cluster) if shares is None
          else mixed_code(params, model_cfg, shares))
  mlp = params["blocks"]["mlp"]
  T_in = mlp["T_in"]  # [L, D, F, h]; T_out [L, F, D, h], T_gate (llama) [L, D, F, h]
  if model_cfg.mlp_kind == "projected":
    M = mlp["M"]  # [L, m, h]
  else:
    eye = jnp.eye(model_cfg.k, dtype=_formed_dtype(params))
    M = jnp.broadcast_to(eye, (T_in.shape[0],) + eye.shape)
  per_layer = jax.vmap(pn_weight, in_axes=(None, 0, 0))
  # Every basis tensor T_x becomes the dense w_x: w_in, w_out, and w_gate for a llama model.
  dense_mlp = {"w" + name[1:]: per_layer(code, M, mlp[name].astype(_formed_dtype(params)))
               for name in ("T_in", "T_out", "T_gate") if name in mlp}
  dense = {name: value for name, value in params.items() if name != "E"}
  dense["blocks"] = {**params["blocks"], "mlp": dense_mlp}
  return dense, small_model_config(model_cfg)
