"""Model FLOPs per training step and MFU against a device peak table.

Counting (PaLM / nanoGPT convention): 6 FLOPs per active matmul parameter per token (forward +
backward) plus 12 * L * T * D per token for attention scores and values. "Active" means the
small model's parameters: a PN or mixture token goes through one expert's MLP. The PN also pays
for forming the expert weights (the einsum over h), once per expert present in the step.
"""

from __future__ import annotations

import jax
import ml_collections

# bf16 dense peak per device, FLOP/s. Matched by substring of jax's device_kind.
PEAK_FLOPS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device | None = None, override_tflops: float = 0.0) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  return peak_flops_of((device or jax.devices()[0]).device_kind)


def peak_flops_of(kind: str) -> float | None:
  """The table's peak for a device kind ("NVIDIA H200", "TPU v5 lite"; also what
  torch.cuda.get_device_name says), None if unknown."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def mlp_matrices(m: ml_collections.ConfigDict) -> int:
  """[D, F]-sized matrices per MLP: 2 (gpt: w_in, w_out), 3 (llama: w_gate too). getattr: a
  config saved before model.arch existed is gpt."""
  return 3 if getattr(m, "arch", "gpt") == "llama" else 2


def active_matmul_params(m: ml_collections.ConfigDict) -> int:
  """Parameters of the small (per-expert) model that multiply activations, unembedding included."""
  per_layer = 4 * m.d_model * m.d_model + mlp_matrices(m) * m.d_model * m.mlp_dim
  return m.n_layers * per_layer + m.d_model * m.vocab_size


def train_flops_per_step(m: ml_collections.ConfigDict, batch: int, seq_len: int,
                         experts_per_step: int = 1) -> float:
  tokens = batch * seq_len
  flops = tokens * (6 * active_matmul_params(m) + 12 * m.n_layers * seq_len * m.d_model)
  if m.mlp_kind != "dense":
    basis = m.k if m.mlp_kind == "mixture" else m.h
    # Forming W = code M T for each expert present: 2 (3: llama) matrices x 2*D*F*h, times 3
    # (fwd + bwd).
    flops += 3 * experts_per_step * m.n_layers * mlp_matrices(m) * (
        2 * m.d_model * m.mlp_dim * basis)
  return float(flops)
