"""SLM-prune: a pretrained dense LM cut to a smaller dense shape, repaired without training.

The route to a small specialized model that the paper cites and never runs: take the LLM, keep
its most important residual channels, attention heads and MLP neurons (scored on generic
calibration batches, in the spirit of K-prune, Park et al., ICLR 2024), then repair the kept
weights by least squares so each pruned block reproduces the LLM's block outputs on the same
calibration text. No gradient step is taken; the result is a plain dense model that is
fine-tuned on a domain like every other method.

The shape. The model has head_dim = d_model / n_heads, so whole heads are kept at the LLM's
head_dim: the pruned model has the target's d_model and MLP width, the LLM's layers and
vocabulary, and d_model / head_dim heads. Its FLOPs and parameters per token equal a dense model
of that d_model and MLP width (attention width = d_model either way); only the head count differs
from the SLM's (the miniature: SLM 4 heads of 32, pruned LLM 2 heads of 64).

Importance (activation based, one pass of the LLM over the calibration tokens):
  residual channel c   sum over the 2L+1 norms of mean(norm_out[c]^2): what the sublayers read
  head n of layer l    mean |heads_n @ wo_n|^2: the energy the head writes into the residual
  neuron j of layer l  mean(hidden_j^2) * |w_out[j]|^2: the energy the neuron writes

Repair (sequential, layer by layer; the pruned model's own inputs, the LLM's outputs as targets):
  each norm's scale is multiplied by mean rms(x[kept]) / rms(x) over the LLM's residuals, so the
  pruned norm's output has the LLM's scale; then the attention output projection wo and the MLP
  output w_out are refit by ridge regression, argmin |A W - Y|^2 + lam |W - W0|^2, A the pruned
  block's head outputs (hidden activations), Y the LLM's sublayer output on the kept channels,
  W0 the sliced weights (the solution is W0 when nothing was pruned). With tied embeddings the
  final norm also takes sqrt(D_s / D): the unembedding is scaled by d_model^-0.5.

Shapes: L layers, D / D_s d_model (LLM / pruned), N / N_s heads, H head_dim, F / F_s MLP width,
B batch, T time, V vocab. Params are the scanned LM's (a leading L axis under "blocks").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax.config import ConfigError
from pn_jax.model.mlp import ACTIVATIONS
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.transformer import rope

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST  # float32 Gram sums on GPU too (not TF32)


@dataclasses.dataclass(frozen=True)
class Shape:
  """The pruned model's widths: d_model (channels kept), n_heads, mlp_dim (neurons kept)."""

  d_model: int
  n_heads: int
  mlp_dim: int


def pruned_shape(cfg: ModelConfig, d_model: int, mlp_dim: int) -> Shape:
  """The shape a dense LM `cfg` prunes to for a target d_model and MLP width (0: keep the
  LLM's); ConfigError naming the key when it cannot."""
  if cfg.mlp_kind != "dense" or cfg.independent_experts:
    raise ConfigError(f"config.init_from holds a {cfg.mlp_kind} model"
                      f"{' of independent experts' if cfg.independent_experts else ''}: pruning "
                      "takes a dense model (an LLM, or a PN's expert projected by "
                      "--mode=specialize)")
  d_model, mlp_dim = d_model or cfg.d_model, mlp_dim or cfg.mlp_dim
  head_dim = cfg.d_model // cfg.n_heads
  if not 0 < d_model <= cfg.d_model:
    raise ConfigError(f"config.prune.d_model: {d_model} must be in [1, {cfg.d_model}] (the "
                      "pruned model keeps a subset of the source's residual channels)")
  if not 0 < mlp_dim <= cfg.mlp_dim:
    raise ConfigError(f"config.prune.mlp_dim: {mlp_dim} must be in [1, {cfg.mlp_dim}] (the "
                      "source's MLP width)")
  if d_model % head_dim:
    raise ConfigError(f"config.prune.d_model: {d_model} is not a multiple of the source's "
                      f"head_dim {head_dim} (d_model {cfg.d_model} / {cfg.n_heads} heads): whole "
                      f"heads are kept, so d_model must be a multiple of {head_dim}")
  return Shape(d_model, d_model // head_dim, mlp_dim)


def pruned_config(cfg: ModelConfig, shape: Shape) -> ModelConfig:
  return dataclasses.replace(cfg, d_model=shape.d_model, n_heads=shape.n_heads,
                             mlp_dim=shape.mlp_dim)


# --- the dense block as pure functions of its params (float32) -----------------------------
def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def attention_heads(p: dict, x_BTD: Array, cfg: ModelConfig) -> Array:
  """Causal attention up to (not including) the output projection -> [B, T, N, H]."""
  q, k, v = (jnp.einsum("BTD,DNH->BTNH", x_BTD, p[w], precision=_HI) for w in ("wq", "wk", "wv"))
  pos = jnp.arange(x_BTD.shape[1])
  q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def mlp_hidden(p: dict, x_BTD: Array, cfg: ModelConfig) -> Array:
  """The MLP's hidden activations [B, T, F] (gated for arch llama)."""
  act = ACTIVATIONS[cfg.activation]
  up = lambda w: jnp.einsum("BTD,DF->BTF", x_BTD, w, precision=_HI)
  return act(up(p["w_in"])) if "w_gate" not in p else act(up(p["w_gate"])) * up(p["w_in"])


def layer(params: dict, l: int) -> dict:
  """Layer l's params (no leading L axis)."""
  return jax.tree.map(lambda x: x[l], params["blocks"])


def embed_tokens(params: dict, tokens_BT: Array) -> Array:
  return jnp.take(params["embed"], tokens_BT, axis=0).astype(jnp.float32)


def logits(params: dict, x_BTD: Array, cfg: ModelConfig) -> Array:
  """The final norm and unembedding of a residual stream (LM's, in float32)."""
  x = rms_norm(x_BTD, params["final_norm"]["scale"], cfg.norm_eps)
  unembed = (params["embed"].T * cfg.d_model ** -0.5 if cfg.tie_embeddings
             else params["unembed"])
  return jnp.einsum("BTD,DV->BTV", x, unembed, precision=_HI)


def forward(params: dict, tokens_BT: Array, cfg: ModelConfig) -> Array:
  """The dense LM's logits from these pieces (equal to LM.apply in float32: tested)."""
  x = embed_tokens(params, tokens_BT)
  for l in range(cfg.n_layers):
    p = layer(params, l)
    a = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
    x = x + jnp.einsum("BTNH,NHD->BTD", attention_heads(p["attn"], a, cfg), p["attn"]["wo"],
                       precision=_HI)
    m = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
    x = x + jnp.einsum("BTF,FD->BTD", mlp_hidden(p["mlp"], m, cfg), p["mlp"]["w_out"],
                       precision=_HI)
  return logits(params, x, cfg)


# --- importance ----------------------------------------------------------------------------
def importance(params: dict, batches: list[Array], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """-> {channels [D], heads [L, N], neurons [L, F]}: mean energies over the calibration
  tokens (module doc)."""
  L = cfg.n_layers

  @jax.jit
  def one(params, tokens_BT):  # (params as an argument: not baked into the program)
    x = embed_tokens(params, tokens_BT)
    channels, heads, neurons = 0.0, [], []
    for l in range(L):
      p = layer(params, l)
      a = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
      o_BTNH = attention_heads(p["attn"], a, cfg)
      per_head = jnp.einsum("BTNH,NHD->BTND", o_BTNH, p["attn"]["wo"], precision=_HI)
      heads.append(jnp.mean(jnp.sum(per_head ** 2, -1), axis=(0, 1)))
      x = x + jnp.sum(per_head, axis=2)
      m = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
      h_BTF = mlp_hidden(p["mlp"], m, cfg)
      neurons.append(jnp.mean(h_BTF ** 2, axis=(0, 1)) * jnp.sum(p["mlp"]["w_out"] ** 2, -1))
      x = x + jnp.einsum("BTF,FD->BTD", h_BTF, p["mlp"]["w_out"], precision=_HI)
      channels = channels + jnp.mean(a ** 2, axis=(0, 1)) + jnp.mean(m ** 2, axis=(0, 1))
    f = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
    channels = channels + jnp.mean(f ** 2, axis=(0, 1))
    return channels, jnp.stack(heads), jnp.stack(neurons)

  totals = None
  for tokens in batches:
    parts = one(params, tokens)
    totals = parts if totals is None else jax.tree.map(jnp.add, totals, parts)
  channels, heads, neurons = (np.asarray(t, np.float64) / len(batches) for t in totals)
  return {"channels": channels, "heads": heads, "neurons": neurons}


@dataclasses.dataclass(frozen=True)
class Keep:
  """Indices kept (ascending): channels [D_s]; heads [L, N_s] and neurons [L, F_s] per layer."""

  channels: np.ndarray
  heads: np.ndarray
  neurons: np.ndarray


def top(scores: np.ndarray, n: int) -> np.ndarray:
  """The indices of the n largest scores along the last axis, ascending (ties: lower index)."""
  order = np.argsort(-scores, axis=-1, kind="stable")[..., :n]
  return np.sort(order, axis=-1)


def choose(scores: dict[str, np.ndarray], shape: Shape) -> Keep:
  return Keep(top(scores["channels"], shape.d_model), top(scores["heads"], shape.n_heads),
              top(scores["neurons"], shape.mlp_dim))


# --- slicing and repair --------------------------------------------------------------------
def slice_params(params: dict, keep: Keep) -> dict:
  """The kept rows/columns of every weight; norm scales as they are (see `repair`)."""
  c, hs, fs = keep.channels, keep.heads, keep.neurons
  per_layer = lambda f: jnp.stack([f(l, layer(params, l)) for l in range(len(hs))])
  attn = {w: per_layer(lambda l, p, w=w: p["attn"][w][c][:, hs[l]]) for w in ("wq", "wk", "wv")}
  attn["wo"] = per_layer(lambda l, p: p["attn"]["wo"][hs[l]][..., c])
  mlp = {"w_in": per_layer(lambda l, p: p["mlp"]["w_in"][c][:, fs[l]]),
         "w_out": per_layer(lambda l, p: p["mlp"]["w_out"][fs[l]][:, c])}
  if "w_gate" in params["blocks"]["mlp"]:
    mlp["w_gate"] = per_layer(lambda l, p: p["mlp"]["w_gate"][c][:, fs[l]])
  blocks = {"attn": attn, "mlp": mlp,
            "attn_norm": {"scale": params["blocks"]["attn_norm"]["scale"][:, c]},
            "mlp_norm": {"scale": params["blocks"]["mlp_norm"]["scale"][:, c]}}
  out = {"embed": params["embed"][:, c], "blocks": blocks,
         "final_norm": {"scale": params["final_norm"]["scale"][c]}}
  if "unembed" in params:
    out["unembed"] = params["unembed"][c]
  return out


def ridge_step(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
  """The ridge regression's change to the sliced weights W0: argmin_d |A d - R|^2 + lam |d|^2
  from gram = A^T A and cross = A^T R, R = Y - A W0 the sliced weights' miss (float64), with
  lam = ridge * mean(diag(gram)) (scale free). Solving for the change, not for W, keeps the
  rounding of a near-exact fit out of the answer: W0 + d is W0 when A W0 = Y."""
  lam = ridge * max(float(np.mean(np.diag(gram))), 1e-30)
  return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), cross)


def _rms_ratio(x: Array, channels: Array) -> Array:
  """sum over tokens of rms(x[kept]) / rms(x): how much smaller the pruned norm's denominator is."""
  full = jnp.sqrt(jnp.mean(x * x, axis=-1) + 1e-30)
  kept = jnp.sqrt(jnp.mean(x[..., channels] ** 2, axis=-1) + 1e-30)
  return jnp.sum(kept / full)


@functools.partial(jax.jit, static_argnames=("cfg", "small_cfg"))
def _attention_pair(p_t, p_s, x_t, x_s, cfg, small_cfg):
  """-> (the LLM's attention output [B, T, D], the pruned heads' outputs [B, T, N_s*H])."""
  a_t = rms_norm(x_t, p_t["attn_norm"]["scale"], cfg.norm_eps)
  y = jnp.einsum("BTNH,NHD->BTD", attention_heads(p_t["attn"], a_t, cfg), p_t["attn"]["wo"],
                 precision=_HI)
  a_s = rms_norm(x_s, p_s["attn_norm"]["scale"], cfg.norm_eps)
  o = attention_heads(p_s["attn"], a_s, small_cfg)
  return y, o.reshape(o.shape[:2] + (-1,))


@functools.partial(jax.jit, static_argnames=("cfg", "small_cfg"))
def _mlp_pair(p_t, p_s, x_t, x_s, cfg, small_cfg):
  """-> (the LLM's MLP output [B, T, D], the pruned hidden activations [B, T, F_s])."""
  h_t = mlp_hidden(p_t["mlp"], rms_norm(x_t, p_t["mlp_norm"]["scale"], cfg.norm_eps), cfg)
  y = jnp.einsum("BTF,FD->BTD", h_t, p_t["mlp"]["w_out"], precision=_HI)
  h_s = mlp_hidden(p_s["mlp"], rms_norm(x_s, p_s["mlp_norm"]["scale"], cfg.norm_eps), small_cfg)
  return y, h_s


@jax.jit
def _grams(a_BTK, y_BTD, w0_KD, channels):
  """-> (A^T A, A^T (Y[kept] - A W0)) of one batch."""
  miss = y_BTD[..., channels] - jnp.einsum("BTi,iD->BTD", a_BTK, w0_KD, precision=_HI)
  return (jnp.einsum("BTi,BTj->ij", a_BTK, a_BTK, precision=_HI),
          jnp.einsum("BTi,BTj->ij", a_BTK, miss, precision=_HI))


def repair(params: dict, small: dict, keep: Keep, batches: list[Array], cfg: ModelConfig,
           ridge: float = 1e-3, solve: bool = True) -> dict:
  """`small` (slice_params of `params`) with its norm scales matched to the LLM's and, with
  `solve`, wo and w_out refit by ridge regression, layer by layer (module doc). The LLM's and the
  pruned model's residual streams of every calibration batch [B, T] are carried along together."""
  c = jnp.asarray(keep.channels)
  D_s = len(keep.channels)
  small_cfg = dataclasses.replace(cfg, d_model=D_s, n_heads=keep.heads.shape[1])
  blocks = jax.tree.map(np.array, small["blocks"])  # host copies, updated layer by layer
  tokens = sum(int(np.prod(t.shape)) for t in batches)
  xs_t = [embed_tokens(params, t) for t in batches]  # the LLM's residual streams
  xs_s = [x[..., c] for x in xs_t]  # the pruned model's
  ratio = jax.jit(_rms_ratio)
  mean_ratio = lambda: sum(float(ratio(x, c)) for x in xs_t) / tokens

  def sublayer(l, pair, norm, weight):
    """One sublayer over every batch: its norm scale matched, its output weight (the param
    path `weight`, [K..., D_s]) refit; both residual streams advanced past it."""
    nonlocal xs_t, xs_s
    blocks[norm]["scale"][l] *= mean_ratio()
    p_t, p_s = layer(params, l), jax.tree.map(lambda x: x[l], blocks)
    outs = [pair(p_t, p_s, x_t, x_s, cfg, small_cfg) for x_t, x_s in zip(xs_t, xs_s)]
    w = blocks[weight[0]][weight[1]]
    if solve:
      w0 = jnp.asarray(w[l]).reshape(-1, D_s)
      sums = [jax.tree.map(lambda v: np.asarray(v, np.float64), _grams(a, y, w0, c))
              for y, a in outs]
      gram, cross = (sum(s[i] for s in sums) for i in (0, 1))
      w[l] = (w[l].astype(np.float64) + ridge_step(gram, cross, ridge).reshape(w[l].shape)
              ).astype(w.dtype)
    w_l = jnp.asarray(w[l]).reshape(-1, D_s)
    xs_t = [x + y for x, (y, _) in zip(xs_t, outs)]
    xs_s = [x + jnp.einsum("BTi,iD->BTD", a, w_l, precision=_HI)
            for x, (_, a) in zip(xs_s, outs)]

  for l in range(cfg.n_layers):
    sublayer(l, _attention_pair, "attn_norm", ("attn", "wo"))
    sublayer(l, _mlp_pair, "mlp_norm", ("mlp", "w_out"))
  final = np.array(small["final_norm"]["scale"]) * mean_ratio()
  if cfg.tie_embeddings:  # the unembedding's d_model^-0.5 (module doc)
    final *= (D_s / cfg.d_model) ** 0.5
  return {**small, "blocks": jax.tree.map(jnp.asarray, blocks),
          "final_norm": {"scale": jnp.asarray(final)}}
