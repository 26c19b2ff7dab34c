"""The model's hyperparameters as one frozen, typed value: what LM, Block, Attention and
IndependentLM hold.

Built at the boundary from the run config's `model` section (`ModelConfig.from_config`), so the
ConfigDict stops there. Frozen and made of scalars, it is hashable, and so is a model holding it:
the model can be a static jit argument (pn_jax/generate.py::generate). Defaults and valid values
stay in pn_jax/config.py (base_config, validate); this type fixes the key set and the types.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from pn_jax.config import ARCHS, ConfigError

# Keys a checkpoint's saved config lacks when its run predates them -> the value that run used.
OLD_RUN_DEFAULTS = {
    "code_init": "random",  # expert codes were independent unit rows before the key existed
    "code_spread": 0.25,  # shared codes' spread was this constant before the key existed
    "independent_experts": False,  # SLM-mix did not exist
    "arch": "gpt",  # the non-gated MLP was the only one
    "mixed_mlp": "per_sequence",  # mixed batches used a weight per sequence
    "basis_dtype": "float32",  # T was stored in param_dtype
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes: V vocab, D d_model, L layers, N heads, F MLP width, k experts, h basis, m code."""

  vocab_size: int  # V
  d_model: int  # D
  n_layers: int  # L
  n_heads: int  # N; head_dim = D / N
  mlp_dim: int  # F: the *small* model's MLP width (the SLM's), for every kind
  mlp_kind: str  # pn_jax.config.MLP_KINDS: dense | mixture | projected
  arch: str  # pn_jax.config.ARCHS: gpt (act(x@w_in)@w_out) | llama (gated MLP, w_gate too)
  k: int  # experts = clusters (mixture, projected, independent experts)
  h: int  # basis slices of the shared tensor T (projected)
  m: int  # code length per expert: E is [k, m] (projected)
  code_init: str  # expert codes' init (projected): shared | random
  code_spread: float  # code_init=shared: each code's own part next to the shared direction
  independent_experts: bool  # SLM-mix: k independent copies of the dense model (experts.py)
  activation: str  # gelu | relu | silu
  tie_embeddings: bool  # unembedding = embedding^T (scaled)
  max_len: int  # RoPE / KV cache length; >= data.seq_len
  rope_theta: float  # RoPE base
  norm_eps: float  # RMSNorm epsilon
  dtype: str  # compute dtype
  param_dtype: str  # parameter dtype
  basis_dtype: str  # "bfloat16": the basis tensors T in bfloat16; "float32": in param_dtype
  scan_layers: bool  # True: one compiled block scanned over layers; False: unrolled
  remat: str  # pn_jax.config.REMAT_POLICIES
  attention: str  # auto (cudnn on GPU) | xla | cudnn
  logits_chunk: int  # >0: chunked cross-entropy over the sequence (read by the loss)
  mixed_mlp: str  # pn_jax.config.MIXED_MLPS: per_sequence | grouped (mixed-cluster batches)

  @classmethod
  def from_config(cls, cd: ml_collections.ConfigDict | ModelConfig | Mapping[str, Any]
                  ) -> ModelConfig:
    """A run config's `model` section (a ConfigDict, a dict from JSON, or a ModelConfig)."""
    if isinstance(cd, ModelConfig):
      return cd
    values = dict(cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else cd)
    values = {**OLD_RUN_DEFAULTS, **values}
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in values]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
      raise ConfigError(f"config.model: a model config needs exactly the keys of base_config()'s "
                        f"model section; missing {missing}, unknown {unknown}")
    return cls(**values)

  def __post_init__(self):
    # validate() checks run configs; this also catches a saved or hand-built model config, which
    # would otherwise build a gpt MLP for any arch it does not know.
    if self.arch not in ARCHS:
      raise ConfigError(f"config.model.arch: unknown architecture {self.arch!r}; choose one of "
                        f"{ARCHS}")

  def to_dict(self) -> dict[str, Any]:
    """Sorted by key, as ConfigDict.to_dict() is: the same JSON either way (export config.json)."""
    return dict(sorted(dataclasses.asdict(self).items()))
