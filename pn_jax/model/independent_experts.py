"""The paper's SLM-mix: k independent dense small models, trained batched over an expert axis.

Nothing is shared: every parameter of the dense `LM` (attention, embeddings, norms, MLP) gets a
leading `expert` axis through `nn.vmap`. Batches are stratified (batches.batch_plan): rows
[c*b, (c+1)*b) of a [B, T] batch belong to cluster c, b = B/k, so expert c sees only its own
cluster's rows and one step costs what one SLM step on B rows costs.

Shapes: B batch, T time, D d_model, V vocab, k experts, b = B/k rows per expert.
"""

from __future__ import annotations

import jax
import flax.linen as nn

from pn_jax.config import small_model_config
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.transformer import LM

Array = jax.Array


class IndependentLM(nn.Module):
  """tokens [B, T] (stratified by expert) -> logits [B, T, V], or hidden [k, b, T, D] and the
  per-expert unembedding [k, D, V]. `cluster_B` and `one_cluster` are accepted for LM's call
  signature and ignored: the row layout is the routing."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, cluster_B: Array | None = None, *,
               one_cluster: bool = False, return_hidden: bool = False):
    del cluster_B, one_cluster
    k = self.cfg.k
    B, T = tokens_BT.shape
    if B % k:
      raise ValueError(f"a batch of {B} rows cannot be split evenly between {k} experts")
    experts = nn.vmap(lambda lm, tokens_bT: lm(tokens_bT, return_hidden=return_hidden),
                      variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=0, out_axes=0, metadata_params={nn.PARTITION_NAME: "expert"})
    # A [B] batch sharded over the data axes reshapes to [k, b] sharded over both axes; the LM's
    # own constraint would move all of it onto b, so it is left to propagation inside.
    rules = tuple((name, None if name == "act_batch" else axes)
                  for name, axes in nn.get_logical_axis_rules())
    with nn.logical_axis_rules(rules):
      small = ModelConfig.from_config(small_model_config(self.cfg))
      out = experts(LM(small, name="experts"),
                    tokens_BT.reshape(k, B // k, T))
    if return_hidden:
      return out  # hidden [k, b, T, D], unembed [k, D, V]
    return out.reshape(B, T, out.shape[-1])
