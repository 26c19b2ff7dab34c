"""The three MLP kinds behind one interface: dense (SLM/LLM), mixture (SLM-mix), projected (PN).

Shapes: B batch, T time, D d_model, F the small model's MLP width, k experts (= clusters),
h basis slices of the shared tensor, m code length, L layers.

Projected networks (paper Sec. 2.5). For layer l and expert i, each MLP matrix is

    W^(l,i)[a, b] = sum_q E[i, q] sum_r M^(l)[q, r] T^(l)[a, b, r]

with E [k, m] shared by all layers (it lives at the LM level), M^(l) [m, h] per layer, and one
T^(l) [D, F, h] / [F, D, h] per matrix. `pn_weight` is that equation; everything else here is
plumbing around it.

Two MLP forms (config.model.arch): "gpt" `act(x @ w_in) @ w_out`, and "llama", the gated MLP
`(act(x @ w_gate) * (x @ w_in)) @ w_out` (Llama's gate/up/down projections, so a dense expert
loads into the Llama ecosystem). Every matrix of either form is dense, mixed or projected alike,
with the same code and M.

The hard mixture is the same computation with h = k, a one-hot code and M = I, so the mixture
reuses the projected path: its per-expert weights are stacked on a trailing "basis" axis and
selected by a one-hot code (tested in tests/test_mlp.py).

Routing is per sequence. `code` is [B, m] (one row per sequence) or [1, m] when the caller knows
the whole batch is one cluster; then the weights are formed once and the MLP is a dense matmul.
With `group_sizes` (config.model.mixed_mlp="grouped"), `code` is [G, m], one row per distinct
cluster of the batch, whose sequences the LM has sorted by cluster: G weights, applied with
`jax.lax.ragged_dot` (`apply_mlp_grouped`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array

ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "silu": nn.silu}


def pn_weight(code: Array, M_mh: Array, T_abh: Array) -> Array:
  """The PN projection: W[..., a, b] = sum_q code[..., q] sum_r M[q, r] T[a, b, r].

  code: [..., m] rows of E (one expert each); M_mh: [m, h]; T_abh: [a, b, h] -> [..., a, b].
  """
  return jnp.einsum("...q,qr,abr->...ab", code, M_mh, T_abh)


def apply_mlp(x_BTD: Array, w_in: Array, w_out: Array, activation: str,
              w_gate: Array | None = None) -> Array:
  """act(x @ w_in) @ w_out, or with `w_gate` (llama) (act(x @ w_gate) * (x @ w_in)) @ w_out;
  weights per sequence ([B, ...]) or shared by the batch ([1, ...])."""
  act = ACTIVATIONS[activation]
  shared = w_in.shape[0] == 1

  def up(w_BDF: Array) -> Array:
    if shared:
      return jnp.einsum("BTD,DF->BTF", x_BTD, w_BDF[0])
    return jnp.einsum("BTD,BDF->BTF", x_BTD, w_BDF)

  h_BTF = act(up(w_in)) if w_gate is None else act(up(w_gate)) * up(w_in)
  h_BTF = nn.with_logical_constraint(h_BTF, ("act_batch", "act_seq", "act_mlp"))
  if shared:
    return jnp.einsum("BTF,FD->BTD", h_BTF, w_out[0])
  return jnp.einsum("BTF,BFD->BTD", h_BTF, w_out)


def apply_mlp_grouped(x_ND: Array, w_in: Array, w_out: Array, activation: str,
                      group_sizes_G: Array, w_gate: Array | None = None) -> Array:
  """`apply_mlp` for a mixed batch whose sequences the LM sorted by cluster (mixed_mlp="grouped").

  Why: one weight per distinct cluster of the batch (w [G, a, b], G <= min(k, B)) instead of
  one per sequence ([B, a, b]), so fewer weights are formed and read. x_ND is the sorted tokens
  [N = B*T, D]: the first group_sizes_G[0] rows use weight 0, the next group_sizes_G[1] rows
  weight 1, ... (0 rows for a padding slot). Each matrix is one `jax.lax.ragged_dot`.
  """
  act = ACTIVATIONS[activation]
  up = lambda w_GDF: jax.lax.ragged_dot(x_ND, w_GDF, group_sizes_G)
  h_NF = act(up(w_in)) if w_gate is None else act(up(w_gate)) * up(w_in)
  return jax.lax.ragged_dot(h_NF, w_out, group_sizes_G)


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype) -> Array:
  """`module.param` whose boxed value carries the logical axis names `axes` (one per dim): the
  mesh rules map them to a sharding (pn_jax/parallel/mesh.py)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense_init(fan_in: int):
  """Normal with variance 1/fan_in, whatever trailing (basis) axes the tensor has.

  Every projected W is scaled to match this (see `MLP`), so PN, mixture and dense start alike.
  """
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class MLP(nn.Module):
  """One block's MLP. `code` ([B|1, m]; one-hot [B|1, k] for mixture) selects the expert; with
  `group_sizes` ([G] tokens per row of `code`), code is [G, m] and x is sorted by cluster.

  Params (per layer; nn.scan adds a leading L axis):
    dense:     w_in [D, F], w_out [F, D]
    mixture:   T_in [D, F, k], T_out [F, D, k]                 (expert i is T[..., i])
    projected: M [m, h], T_in [D, F, h], T_out [F, D, h]       (E [k, m] lives in the LM)
  `gated` (arch "llama") adds the gate, shaped and initialised like w_in / T_in:
    dense: w_gate [D, F]; mixture: T_gate [D, F, k]; projected: T_gate [D, F, h]
  """

  kind: str  # pn_jax.config.MLP_KINDS
  d_model: int
  mlp_dim: int
  h: int = 1
  m: int = 1
  activation: str = "gelu"
  gated: bool = False  # arch "llama": (act(x @ w_gate) * (x @ w_in)) @ w_out
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  basis_dtype: jnp.dtype | None = None  # T's dtype (model.basis_dtype); None: param_dtype

  @nn.compact
  def __call__(self, x_BTD: Array, code: Array | None, group_sizes: Array | None = None
               ) -> Array:
    # Params are created in the order w_in, w_out[, w_gate] (T_in, T_out[, T_gate], M): the gate
    # is only added when gated, so a gpt model's init draws exactly what it drew before.
    D, F, pd = self.d_model, self.mlp_dim, self.param_dtype
    if self.kind == "dense":
      w = {"w_in": logical_param(self, "w_in", dense_init(D), (D, F), ("embed", "mlp"), pd),
           "w_out": logical_param(self, "w_out", dense_init(F), (F, D), ("mlp", "embed"), pd)}
      if self.gated:
        w["w_gate"] = logical_param(self, "w_gate", dense_init(D), (D, F), ("embed", "mlp"), pd)
      w = {name: w_ab[None] for name, w_ab in w.items()}  # [1, a, b]: shared by the batch
    else:
      w = self._formed_weights(code)
    if group_sizes is not None:  # grouped: x sorted by cluster, one weight per distinct cluster
      B, T, D = x_BTD.shape
      w = {name: w_ab.astype(self.dtype) for name, w_ab in w.items()}
      y_ND = apply_mlp_grouped(x_BTD.reshape(B * T, D), w["w_in"], w["w_out"], self.activation,
                               group_sizes, w.get("w_gate"))
      return y_ND.reshape(B, T, D)
    return apply_mlp(x_BTD, w["w_in"].astype(self.dtype), w["w_out"].astype(self.dtype),
                     self.activation,
                     w["w_gate"].astype(self.dtype) if self.gated else None)

  def _formed_weights(self, code: Array) -> dict[str, Array]:
    """Mixture / projected: each matrix W = pn_weight(code, M, T) -> {w_in, w_out[, w_gate]}."""
    D, F, pd = self.d_model, self.mlp_dim, self.param_dtype
    td = self.basis_dtype or pd
    # T's basis axis is the last one and stays unsharded (rule `basis`): forming W needs no
    # communication and W comes out with a dense weight's sharding.
    T_in = logical_param(self, "T_in", dense_init(D), (D, F, self.h),
                         ("embed", "mlp", "basis"), td)
    T_out = logical_param(self, "T_out", dense_init(F), (F, D, self.h),
                          ("mlp", "embed", "basis"), td)
    T = {"w_in": T_in, "w_out": T_out}
    if self.gated:
      T["w_gate"] = logical_param(self, "T_gate", dense_init(D), (D, F, self.h),
                                  ("embed", "mlp", "basis"), td)
    if self.kind == "projected":
      # Orthonormal rows: with unit-norm codes, |code @ M| = 1, so Var(W) = Var(T) = dense.
      M = logical_param(self, "M", nn.initializers.orthogonal(), (self.m, self.h),
                        ("code", "basis"), pd)
    else:  # mixture: PN with h = k, a one-hot code and M = I
      M = jnp.eye(self.h, dtype=pd)
    # Formed in T's dtype straight from T (one read of T, no copy of it in another dtype; its
    # gradient is one fused outer product in T's dtype), then rounded once, as project() does.
    # A bfloat16 T takes the code and M rounded to bfloat16 (the GEMM accumulates in float32).
    code, M = code.astype(td), M.astype(td)
    return {name: pn_weight(code, M, T_abh) for name, T_abh in T.items()}  # [B|1|G, a, b]
