"""Decoder-only pre-norm transformer LM whose MLP is dense, a hard mixture, or projected (PN).

Attention, embeddings and norms are ordinary parameters shared by every expert; only the MLP
depends on the sequence's cluster (see mlp.py). Layers go through `nn.scan` (params with a leading
`layers` axis), fully unrolled by default (`model.scan_layers=False`) or as one compiled block,
and optionally rematerialised (`model.remat`).

Shapes: B batch, T time, D d_model, N heads, H head_dim, V vocab, k experts, m code length.
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import flax.linen as nn

from pn_jax.config import REMAT_POLICIES
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.mlp import MLP, logical_param

Array = jax.Array


def remat_policy(name: str):
  """model.remat (not "none") -> the policy nn.remat gets (pn_jax.config.REMAT_POLICIES)."""
  attr, args = REMAT_POLICIES[name]
  if attr is None:
    return None
  policy = getattr(jax.checkpoint_policies, attr)
  return policy if args is None else policy(*args)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                          self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x_BTNH: Array, positions_T: Array, theta: float) -> Array:
  """Rotary position embedding (rotate-half form) in float32."""
  H = x_BTNH.shape[-1]
  freqs = theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # [H/2]
  angles = positions_T[:, None].astype(jnp.float32) * freqs[None, :]  # [T, H/2]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def attention_impl(name: str, dtype=jnp.bfloat16) -> str | None:
  """'auto': cuDNN flash attention on GPU for the 16-bit dtypes it supports, the XLA kernel
  otherwise (float32 models, e.g. the tiny configs, and other backends)."""
  if name == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"
  return name


class Attention(nn.Module):
  cfg: ModelConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.cfg
    D, N = c.d_model, c.n_heads
    H = D // N
    init = nn.initializers.normal(stddev=D ** -0.5)
    wq, wk, wv = (logical_param(self, n, init, (D, N, H), ("embed", "heads", "head_dim"),
                                self.param_dtype).astype(self.dtype) for n in ("wq", "wk", "wv"))
    wo = logical_param(self, "wo", nn.initializers.normal(stddev=D ** -0.5), (N, H, D),
                       ("heads", "head_dim", "embed"), self.param_dtype).astype(self.dtype)
    # Decoding (pn_jax.generate): a mutable "cache" collection holds this layer's keys/values.
    # (init makes every collection mutable: it must still trace the training path.)
    decoding = self.is_mutable_collection("cache") and not self.is_initializing()
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32)) if decoding else None
    positions = (index.value if decoding else 0) + jnp.arange(x_BTD.shape[1])
    q = rope(jnp.einsum("BTD,DNH->BTNH", x_BTD, wq), positions, c.rope_theta)
    k = rope(jnp.einsum("BTD,DNH->BTNH", x_BTD, wk), positions, c.rope_theta)
    v = jnp.einsum("BTD,DNH->BTNH", x_BTD, wv)
    spec = ("act_batch", "act_seq", "act_heads", None)
    q, k, v = (nn.with_logical_constraint(t, spec) for t in (q, k, v))
    if decoding:
      out = self._attend_cached(q, k, v, positions, index)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=attention_impl(c.attention, q.dtype))
    return jnp.einsum("BTNH,NHD->BTD", out, wo)

  def _attend_cached(self, q_BTNH: Array, k_BTNH: Array, v_BTNH: Array, positions_T: Array,
                     index) -> Array:
    """Writes this call's keys/values at `positions` of a [B, max_len, N, H] cache and attends
    each query to every cached position <= its own (same result as the causal full pass)."""
    B, T, N, H = k_BTNH.shape
    S = self.cfg.max_len
    cached_k = self.variable("cache", "k", jnp.zeros, (B, S, N, H), k_BTNH.dtype)
    cached_v = self.variable("cache", "v", jnp.zeros, (B, S, N, H), v_BTNH.dtype)
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BTNH, (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BTNH, (0, start, 0, 0))
    index.value = start + T
    mask_TS = jnp.arange(S)[None, :] <= positions_T[:, None]
    return jax.nn.dot_product_attention(q_BTNH, cached_k.value, cached_v.value,
                                        mask=mask_TS[None, None], implementation="xla")


def basis_dtype(c: ModelConfig) -> jnp.dtype:
  """The basis tensors T's dtype: bfloat16 when model.basis_dtype says so, else param_dtype."""
  return jnp.dtype(jnp.bfloat16 if c.basis_dtype == "bfloat16" else c.param_dtype)


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x), code). Scanned over layers."""

  cfg: ModelConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BTD: Array, code: Array | None, group_sizes: Array | None = None):
    c = self.cfg
    norm = functools.partial(RMSNorm, c.norm_eps, self.dtype, self.param_dtype)
    attn = Attention(c, self.dtype, self.param_dtype, name="attn")
    attn_out = attn(norm(name="attn_norm")(x_BTD))
    x_BTD = x_BTD + checkpoint_name(attn_out, "attn_out")
    mlp = MLP(kind=c.mlp_kind, d_model=c.d_model, mlp_dim=c.mlp_dim,
              h=c.k if c.mlp_kind == "mixture" else c.h, m=c.m, activation=c.activation,
              gated=c.arch == "llama", dtype=self.dtype, param_dtype=self.param_dtype,
              basis_dtype=basis_dtype(c), name="mlp")
    mlp_out = mlp(norm(name="mlp_norm")(x_BTD), code, group_sizes)
    x_BTD = x_BTD + checkpoint_name(mlp_out, "mlp_out")
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))
    return x_BTD, None


class LM(nn.Module):
  """tokens [B, T] int32, cluster [B] int32 -> logits [B, T, V] (or hidden + unembedding).

  `one_cluster=True` promises every sequence of the batch has cluster[0] (the data pipeline's
  homogeneous batches); the expert's weights are then formed once per step instead of once per
  sequence. Otherwise `cfg.mixed_mlp` picks the mixed-batch MLP: "per_sequence" (a weight per
  sequence) or "grouped" (the sequences sorted by cluster, a weight per distinct cluster:
  `cluster_groups`, mlp.apply_mlp_grouped; outputs back in the caller's order). The result is
  the same every way.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, cluster_B: Array | None = None, *,
               one_cluster: bool = False, return_hidden: bool = False):
    c = self.cfg
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    if c.mlp_kind != "dense" and cluster_B is None:
      raise ValueError(f"mlp_kind={c.mlp_kind!r} needs a cluster id per sequence")
    groups = None  # grouped: (order_B, slot clusters [G], tokens per slot [G])
    if c.mlp_kind in ("projected", "mixture") and not one_cluster and c.mixed_mlp == "grouped":
      groups = cluster_groups(cluster_B, c.k, tokens_BT.shape[1])
      tokens_BT = tokens_BT[groups[0]]  # sequences sorted by cluster
    embed = logical_param(self, "embed", nn.initializers.normal(stddev=1.0),
                          (c.vocab_size, c.d_model), ("vocab", "embed"), pdtype)
    x_BTD = jnp.take(embed, tokens_BT, axis=0).astype(dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))

    code = None
    if c.mlp_kind != "dense":
      cluster = (groups[1] if groups is not None else
                 cluster_B[:1] if one_cluster else cluster_B)
      if c.mlp_kind == "projected":
        init = CODE_INITS[c.code_init]
        if c.code_init == "shared":
          init = functools.partial(init, spread=c.code_spread)
        E = logical_param(self, "E", init, (c.k, c.m), ("expert", "code"), pdtype)
        code = jnp.take(E, cluster, axis=0)  # [B|1|G, m]
      else:
        code = jax.nn.one_hot(cluster, c.k, dtype=pdtype)  # [B|1|G, k]

    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=remat_policy(c.remat), prevent_cse=False)
    # scan_layers=False unrolls the scan fully (same stacked params): no per-layer stacking of
    # residuals into [L, ...] buffers and their copies, at a longer compile (docs/benchmarks.md).
    blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=c.n_layers,
                     unroll=1 if c.scan_layers else c.n_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    block_args = (x_BTD, code) if groups is None else (x_BTD, code, groups[2])
    x_BTD, _ = blocks(c, dtype, pdtype, name="blocks")(*block_args)
    if groups is not None:
      x_BTD = x_BTD[jnp.argsort(groups[0])]  # back to the caller's order
    x_BTD = RMSNorm(c.norm_eps, dtype, pdtype, name="final_norm")(x_BTD)

    if c.tie_embeddings:
      # Embedding rows have unit variance; scale so the logits start at unit variance too.
      unembed_DV = embed.T.astype(dtype) * (c.d_model ** -0.5)
    else:
      unembed_DV = logical_param(self, "unembed", nn.initializers.normal(stddev=c.d_model ** -0.5),
                                 (c.d_model, c.vocab_size), ("embed", "vocab"),
                                 pdtype).astype(dtype)
    if return_hidden:
      return x_BTD, unembed_DV
    logits = jnp.einsum("BTD,DV->BTV", x_BTD, unembed_DV)
    return nn.with_logical_constraint(logits, ("act_batch", "act_seq", "act_vocab"))


def cluster_groups(cluster_B: Array, k: int, seq_len: int) -> tuple[Array, Array, Array]:
  """The grouped mixed-batch MLP's layout (model.mixed_mlp="grouped"): -> (order_B, the
  sequences sorted by cluster (stable); slot_G, the batch's distinct clusters ascending, one per
  slot, G = min(k, B) static slots, padding slots clipped to k - 1 for the code look-up;
  group_sizes_G, int32 tokens (sequences * seq_len) of each slot, 0 for a padding slot)."""
  G = min(k, cluster_B.shape[0])
  order_B = jnp.argsort(cluster_B, stable=True)
  slot_G = jnp.unique(cluster_B, size=G, fill_value=k)  # k: matches no sequence
  group_sizes_G = jnp.sum(cluster_B[None, :] == slot_G[:, None], axis=1) * seq_len
  return order_B, jnp.minimum(slot_G, k - 1), group_sizes_G.astype(jnp.int32)


def unit_rows_init(key, shape, dtype=jnp.float32):
  """Expert codes E [k, m] with unit-norm rows (see MLP: keeps Var(W) at the dense init's)."""
  e = jax.random.normal(key, shape, jnp.float32)
  return (e / jnp.linalg.norm(e, axis=-1, keepdims=True)).astype(dtype)


def shared_rows_init(key, shape, dtype=jnp.float32, spread: float = 0.25):
  """Unit-norm codes near one shared direction u: E[i] ~ u + spread g_i / |g_i| (cosine between
  experts ~0.94 at spread 0.25; model.code_spread). Why: with independent random codes the part of the gradient that every
  cluster shares reaches T as sum_i E[i] M G, whose terms point in unrelated directions; with a
  shared direction they add up, so the experts start as one SLM and drift apart as their
  clusters' gradients differ. The paper leaves the initialisation open (docs/design.md)."""
  k_u, k_g = jax.random.split(key)
  u = jax.random.normal(k_u, shape[-1:], jnp.float32)
  g = jax.random.normal(k_g, shape, jnp.float32)
  e = u / jnp.linalg.norm(u) + spread * g / jnp.linalg.norm(g, axis=-1, keepdims=True)
  return (e / jnp.linalg.norm(e, axis=-1, keepdims=True)).astype(dtype)


CODE_INITS = {"random": unit_rows_init, "shared": shared_rows_init}


def init_params(model, rng: Array, batch_size: int = 1, seq_len: int = 8):
  """Boxed params (nn.Partitioned leaves carry logical axes); use nn.unbox for plain arrays.

  `model` is an LM or an IndependentLM (which needs one row per expert at least).
  """
  if model.cfg.independent_experts:
    batch_size *= model.cfg.k
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  cluster = jnp.zeros((batch_size,), jnp.int32)
  return jax.jit(model.init)(rng, tokens, cluster)["params"]
