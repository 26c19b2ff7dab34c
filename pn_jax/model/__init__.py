"""Models: the LM (dense / mixture / projected MLP) and k independent LMs (SLM-mix)."""

import ml_collections

from pn_jax.model.model_config import ModelConfig
from pn_jax.model.independent_experts import IndependentLM
from pn_jax.model.transformer import LM


def build_model(model_cfg: ml_collections.ConfigDict | ModelConfig) -> LM | IndependentLM:
  """The flax module a model config describes: LM, or IndependentLM for independent experts.

  The run config's `model` section becomes a ModelConfig here, so the module is hashable."""
  cfg = ModelConfig.from_config(model_cfg)
  return IndependentLM(cfg) if cfg.independent_experts else LM(cfg)
