"""Text generation with a KV cache: temperature / top-k / top-p, deterministic under a seed.

The cache is the model's flax "cache" collection (pn_jax/model/transformer.py Attention): the
prompt is run once (prefill), then one token per step attends to the cached keys/values. Token i
is drawn with key fold_in(seed key, i), so the cached and the uncached path (which re-runs the
whole prefix every step; kept as the reference the tests compare against) draw the same tokens.

Shapes: B samples, T0 prompt length, S = T0 + new tokens, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def filter_logits(logits_BV: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
  neg = jnp.finfo(jnp.float32).min
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < top_p  # always keeps the most likely token
    cutoff = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff, neg, logits_BV)
  return logits_BV


def sample_token(key: Array, logits_BV: Array, temperature: float, top_k: int,
                 top_p: float) -> Array:
  """-> int32 [B]. temperature 0 is greedy."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "new_tokens", "temperature", "top_k",
                                             "top_p", "use_cache"))
def _generate(params, prompt_BT: Array, cluster_B: Array, key: Array, *, model, new_tokens: int,
              temperature: float, top_k: int, top_p: float, use_cache: bool) -> Array:
  B, T0 = prompt_BT.shape
  pick = lambda i, logits: sample_token(jax.random.fold_in(key, i), logits, temperature, top_k,
                                        top_p)
  if not use_cache:
    tokens_BS = jnp.concatenate([prompt_BT, jnp.zeros((B, new_tokens), jnp.int32)], axis=1)

    def step(tokens_BS, i):
      logits = model.apply({"params": params}, tokens_BS, cluster_B, one_cluster=True)
      tok = pick(i, jax.lax.dynamic_index_in_dim(logits, T0 + i - 1, axis=1, keepdims=False))
      return jax.lax.dynamic_update_slice(tokens_BS, tok[:, None], (0, T0 + i)), None

    tokens_BS, _ = jax.lax.scan(step, tokens_BS, jnp.arange(new_tokens))
    return tokens_BS

  logits, variables = model.apply({"params": params}, prompt_BT, cluster_B, one_cluster=True,
                                  mutable=["cache"])
  first = pick(0, logits[:, -1])

  def step(carry, i):
    cache, tok_B = carry
    logits, variables = model.apply({"params": params, "cache": cache}, tok_B[:, None],
                                    cluster_B, one_cluster=True, mutable=["cache"])
    nxt = pick(i, logits[:, -1])
    return (variables["cache"], nxt), nxt

  (_, _), rest = jax.lax.scan(step, (variables["cache"], first), jnp.arange(1, new_tokens))
  return jnp.concatenate([prompt_BT, first[:, None], rest.T], axis=1)


def generate(model, params, prompt_ids, *, new_tokens: int, seed: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1, cluster: int = 0, use_cache: bool = True) -> Array:
  """prompt ids [T0] (one prompt, >= 1 token) -> int32 [num_samples, T0 + new_tokens]."""
  prompt = jnp.asarray(prompt_ids, jnp.int32).reshape(1, -1)
  if prompt.shape[1] < 1:
    raise ValueError("the prompt needs at least one token (e.g. bos)")
  if prompt.shape[1] + new_tokens > model.cfg.max_len:
    raise ValueError(f"prompt ({prompt.shape[1]}) + new tokens ({new_tokens}) exceed the "
                     f"model's max_len={model.cfg.max_len}")
  prompt_BT = jnp.tile(prompt, (num_samples, 1))
  cluster_B = jnp.full((num_samples,), cluster, jnp.int32)
  # The model (hashable: it holds a frozen ModelConfig) and the settings are static: jit's own
  # cache keeps one compiled sampler per distinct model and settings.
  return _generate(params, prompt_BT, cluster_B, jax.random.key(seed), model=model,
                   new_tokens=int(new_tokens), temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), use_cache=bool(use_cache))


def cached_logits(model, params, tokens_BT: Array, prefix: int, cluster_B: Array | None = None):
  """Logits [B, T, V] computed as the sampler does: a prefill of `prefix` tokens, then one token
  per call through the cache. Equal (to float rounding) to model.apply on the whole sequence."""
  one = cluster_B is not None
  prefill = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, one_cluster=one,
                                                mutable=["cache"]))
  step = jax.jit(lambda p, cache, t, c: model.apply({"params": p, "cache": cache}, t, c,
                                                    one_cluster=one, mutable=["cache"]))
  logits, variables = prefill(params, tokens_BT[:, :prefix], cluster_B)
  out = [logits]
  for t in range(prefix, tokens_BT.shape[1]):
    logits, variables = step(params, variables["cache"], tokens_BT[:, t:t + 1], cluster_B)
    out.append(logits)
  return jnp.concatenate(out, axis=1)
