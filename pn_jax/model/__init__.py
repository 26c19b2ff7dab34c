"""Models: the LM (dense / mixture / projected MLP) and k independent LMs (SLM-mix)."""

import ml_collections

from pn_jax.model.experts import IndependentLM
from pn_jax.model.transformer import LM


def build_model(model_cfg: ml_collections.ConfigDict) -> LM | IndependentLM:
  """The flax module a model config describes: LM, or IndependentLM for independent experts."""
  if model_cfg.get("independent_experts", False):
    return IndependentLM(model_cfg)
  return LM(model_cfg)
