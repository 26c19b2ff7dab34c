"""Micro-benchmark of one projected MLP matrix with mixed-cluster batches, forward + backward.

    python3 configs/bench/mlp_probe.py [--batch=32 --seq=1024 --d=768 --f=3072 --k=32 --h=24]

Times y = x @ W[cluster] and its gradients (x and T), W = code @ T formed from the basis, for
each way of forming and applying the expert weights: one shared weight (one-cluster batches),
one per sequence and grouped by cluster with ragged_dot (pn_jax/model/mlp.py's paths), and the
latter two formed from a bf16 copy of T. Prints one JSON line each (median ms of synchronised
calls). Why: the mixed-batch PN step is slower than the one-cluster
step by how these move the [B|k, D, F] weights; this isolates that from the rest of the model.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax.model.transformer import cluster_groups


def timed(fn, *args, steps=20):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def variants(k):
  bf = jnp.bfloat16

  def shared(x, c, T, cl):  # one cluster: W formed once, a dense matmul
    W = jnp.einsum("q,abq->ab", c[0], T).astype(bf)
    return jnp.einsum("BTD,DF->BTF", x, W)

  def per_seq(x, c, T, cl):  # today's mixed path: W formed per sequence in fp32, then rounded
    W = jnp.einsum("Bq,abq->Bab", c[cl], T).astype(bf)
    return jnp.einsum("BTD,BDF->BTF", x, W)

  def per_seq_bf16(x, c, T, cl):  # per sequence, formed from a bf16 copy of T, bf16 out
    W = jnp.einsum("Bq,abq->Bab", c[cl].astype(bf), T.astype(bf), preferred_element_type=bf)
    return jnp.einsum("BTD,BDF->BTF", x, W)

  def grouped(x, c, T, cl, form_bf16=False):  # the model's grouped layout, then ragged_dot
    B, S, D = x.shape
    order, slot, sizes = cluster_groups(cl, k, S)  # G = min(k, B) weights
    if form_bf16:
      W = jnp.einsum("Gq,abq->Gab", c[slot].astype(bf), T.astype(bf), preferred_element_type=bf)
    else:
      W = jnp.einsum("Gq,abq->Gab", c[slot], T).astype(bf)
    y = jax.lax.ragged_dot(x[order].reshape(B * S, D), W, sizes)
    return y.reshape(B, S, -1)[jnp.argsort(order)]

  return {"shared": shared, "per_seq": per_seq, "per_seq_bf16": per_seq_bf16,
          "grouped": grouped, "grouped_bf16": lambda *a: grouped(*a, form_bf16=True)}


def main():
  p = argparse.ArgumentParser()
  for name, default in dict(batch=32, seq=1024, d=768, f=3072, k=32, h=24).items():
    p.add_argument(f"--{name}", type=int, default=default)
  a = p.parse_args()
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (a.batch, a.seq, a.d), jnp.bfloat16)
  c = jax.random.normal(keys[1], (a.k, a.h), jnp.float32) / a.h ** 0.5
  T = jax.random.normal(keys[2], (a.d, a.f, a.h), jnp.float32) / a.d ** 0.5
  cl = jax.random.randint(keys[3], (a.batch,), 0, a.k)
  g = jax.random.normal(keys[0], (a.batch, a.seq, a.f), jnp.bfloat16)
  flops = 2 * a.batch * a.seq * a.d * a.f
  ref = None
  for name, fn in variants(a.k).items():
    loss = lambda x, T, fn=fn: jnp.vdot(fn(x, c, T, cl).astype(jnp.float32), g.astype(jnp.float32))
    fwd = jax.jit(lambda x, T, fn=fn: fn(x, c, T, cl))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    hlo = fwd_bwd.lower(x, T).compile().as_text()
    out = fwd(x, T)
    if name == "per_seq":
      ref = out
    err = None if ref is None or name == "shared" else float(
        jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    ms_f, ms_fb = timed(fwd, x, T), timed(fwd_bwd, x, T)
    print(json.dumps({"variant": name, "fwd_ms": round(ms_f, 3), "fwd_bwd_ms": round(ms_fb, 3),
                      "matmul_tflops_fwd_bwd": round(3 * flops / ms_fb / 1e9, 1),
                      "max_abs_diff_vs_per_seq": err, "device": jax.devices()[0].device_kind,
                      "cudnn_calls": hlo.count("__cudnn"), "ragged_in_hlo": "ragged" in hlo,
                      **vars(a)}), flush=True)


if __name__ == "__main__":
  main()
