"""The PyTorch peer of `pn_jax.bench`'s dense step: the same model, trained the nanoGPT way.

  python configs/bench/torch_peer.py --config=configs/bench/gpt2_dense.py          (GPU)
  python configs/bench/torch_peer.py --config=configs/bench/gpt2_dense.py:tiny --compile=0  (CPU)

Reads a pn-jax bench config so that both sides train one model: pn-jax's architecture
(pre-norm RMSNorm, rotate-half RoPE, no biases, the MLP act(x @ w_in) @ w_out, or the gated one
with model.arch=llama, tied embeddings with logits scaled by d_model**-0.5), bf16 autocast over
fp32 parameters, flash attention (F.scaled_dot_product_attention, causal), the fused AdamW of
torch.optim with the config's betas, eps, weight decay on matrices, global-norm clipping and a
constant lr (the schedule costs nothing), `torch.compile` of the model. The step is timed as
pn_jax.bench times its own: median of `bench.steps` synchronised steps after `bench.warmup`
untimed ones, on random tokens. Prints one JSON line with pn_jax.bench's field names; MFU uses
the same FLOP count (pn_jax/train/flops.py) and device peak table, so the two lines compare
directly (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from pn_jax.config import load_module, small_model_config  # noqa: E402
from pn_jax.train import flops as flops_lib  # noqa: E402

ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}


class RMSNorm(nn.Module):
  def __init__(self, d: int, eps: float):
    super().__init__()
    self.eps, self.scale = eps, nn.Parameter(torch.ones(d))

  def forward(self, x):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (x32 * self.scale).to(x.dtype)


def rope(x_BNTH, cos, sin):
  """Rotate-half RoPE in float32 (pn_jax/model/transformer.py::rope); cos, sin: [T, H/2]."""
  x1, x2 = x_BNTH.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BNTH.dtype)


class Block(nn.Module):
  def __init__(self, m):
    super().__init__()
    D, F_ = m.d_model, m.mlp_dim
    self.n_heads, self.act = m.n_heads, ACTIVATIONS[m.activation]
    self.attn_norm, self.mlp_norm = RMSNorm(D, m.norm_eps), RMSNorm(D, m.norm_eps)
    self.qkv, self.wo = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
    self.w_in, self.w_out = nn.Linear(D, F_, bias=False), nn.Linear(F_, D, bias=False)
    self.w_gate = nn.Linear(D, F_, bias=False) if m.get("arch", "gpt") == "llama" else None

  def forward(self, x_BTD, cos, sin):
    B, T, D = x_BTD.shape
    q, k, v = self.qkv(self.attn_norm(x_BTD)).split(D, dim=-1)
    q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
    x_BTD = x_BTD + self.wo(out.transpose(1, 2).reshape(B, T, D))
    h = self.mlp_norm(x_BTD)
    up = self.act(self.w_in(h)) if self.w_gate is None else self.act(self.w_gate(h)) * self.w_in(h)
    return x_BTD + self.w_out(up)


class GPT(nn.Module):
  """pn-jax's dense LM (tied embeddings) in PyTorch."""

  def __init__(self, m):
    super().__init__()
    if not m.tie_embeddings:
      raise SystemExit("torch_peer: the bench model has tied embeddings; this config has not")
    self.embed = nn.Embedding(m.vocab_size, m.d_model)
    nn.init.normal_(self.embed.weight, std=1.0)
    self.blocks = nn.ModuleList(Block(m) for _ in range(m.n_layers))
    self.final_norm = RMSNorm(m.d_model, m.norm_eps)
    self.logit_scale = m.d_model ** -0.5
    H = m.d_model // m.n_heads
    freqs = m.rope_theta ** (-torch.arange(0, H, 2, dtype=torch.float32) / H)
    angles = torch.arange(m.max_len, dtype=torch.float32)[:, None] * freqs[None, :]
    self.register_buffer("cos", angles.cos(), persistent=False)  # [max_len, H/2]
    self.register_buffer("sin", angles.sin(), persistent=False)

  def forward(self, tokens_BT, targets_BT):
    T = tokens_BT.shape[1]
    x = self.embed(tokens_BT)
    for block in self.blocks:
      x = block(x, self.cos[:T], self.sin[:T])
    logits = F.linear(self.final_norm(x), self.embed.weight) * self.logit_scale
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BT.view(-1))


def optimizer(model: nn.Module, o) -> torch.optim.Optimizer:
  """Fused AdamW, weight decay on matrices (pn-jax's decay mask: no norms)."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  rest = [p for p in model.parameters() if p.dim() < 2]
  fused = next(model.parameters()).is_cuda
  return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, fused=fused)


def make_step(model, opt, clip_norm: float, dtype):
  def step(tokens, targets):
    autocast = (torch.autocast(device_type=tokens.device.type, dtype=dtype)
                if dtype != torch.float32 else contextlib.nullcontext())
    with autocast:
      loss = model(tokens, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return step


def sync(device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def time_steps(step, batches, config, device) -> tuple[list[float], float, float]:
  """Compile (first step), warm-up, then synchronised timed steps -> (times, compile_s, loss)."""
  t0 = time.perf_counter()
  step(*batches[0])
  sync(device)
  compile_s = time.perf_counter() - t0
  for i in range(config.bench.warmup):
    step(*batches[i % 2])
  sync(device)
  times, loss = [], None
  for i in range(config.bench.steps):
    t0 = time.perf_counter()
    loss = step(*batches[i % 2])
    sync(device)
    times.append(time.perf_counter() - t0)
  return times, compile_s, float(loss)


def record(config, args, model, device, times, compile_s, loss) -> dict:
  m, B, T = config.model, config.data.batch_size, config.data.seq_len
  step_s = statistics.median(times)
  model_flops = flops_lib.train_flops_per_step(small_model_config(m), B, T)
  kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  peak = flops_lib.peak_flops_of(kind)
  return {
      "config": f"torch_peer[{config.name}]", "device_kind": kind, "devices": 1,
      "platform": device.type, "arch": m.get("arch", "gpt"), "batch": B, "seq_len": T,
      "compiled": bool(args.compile), "params": sum(p.numel() for p in model.parameters()),
      "step_time_s": step_s, "step_time_min_s": min(times), "tokens_per_s": B * T / step_s,
      "model_tflops_per_step": model_flops / 1e12,
      "mfu": model_flops / step_s / peak if peak else None, "compile_s": compile_s,
      "peak_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                   if device.type == "cuda" else None),
      "loss": loss, "torch": torch.__version__,
      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="a pn-jax bench config, e.g. "
                 "configs/bench/gpt2_dense.py[:tiny]")
  p.add_argument("--compile", type=int, default=1, help="1: torch.compile the model")
  args = p.parse_args(argv)
  path, _, arg = args.config.partition(":")
  config = load_module(path).get_config(arg or None)
  if config.model.mlp_kind != "dense":
    p.error("the peer trains the dense model: give configs/bench/gpt2_dense.py")
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(config.seed)
  torch.backends.cuda.matmul.allow_tf32 = True
  model = GPT(config.model).to(device)
  opt = optimizer(model, config.optim)
  compiled = torch.compile(model) if args.compile else model
  dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
  step = make_step(compiled, opt, config.optim.clip_norm, dtype)
  B, T, V = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  batches = [(torch.randint(0, V, (B, T), device=device), torch.randint(0, V, (B, T), device=device))
             for _ in range(2)]
  times, compile_s, loss = time_steps(step, batches, config, device)
  if not math.isfinite(loss):
    raise SystemExit(f"torch_peer: non-finite loss {loss}")
  print(json.dumps(record(config, args, model, device, times, compile_s, loss)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
