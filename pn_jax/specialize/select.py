"""Which expert a domain gets: its most frequent cluster, or the expert with the lowest loss.

Both look at the same limited domain training set the fine-tuning sees (the `max_tokens` prefix
of the shuffled split that pipeline.domain_iterator uses), embedded with the pretraining run's
saved cluster model.
"""

from __future__ import annotations

import jax
import numpy as np

from pn_jax.data import pipeline
from pn_jax.parallel import mesh as mesh_lib


def domain_windows(run_data: pipeline.RunData, domain: str, max_tokens: int | None) -> list:
  """The domain training set's clustering windows, in the order/subset domain_iterator uses."""
  docs = pipeline.domain_docs(run_data, domain, "train", max_tokens)
  return pipeline.windows_of(docs, run_data.window)


def domain_histogram(run_data: pipeline.RunData, domain: str,
                     max_tokens: int | None = None) -> np.ndarray:
  """float64 [k]: fraction of the domain's training tokens in each cluster."""
  wins = domain_windows(run_data, domain, max_tokens)
  ids = pipeline.assign_clusters(run_data, run_data.tokenizer.decode_batch(wins))
  counts = np.bincount(ids, weights=[len(w) for w in wins], minlength=run_data.num_clusters)
  return counts / max(counts.sum(), 1.0)


def most_frequent(run_data: pipeline.RunData, domain: str, max_tokens: int | None) -> int:
  """The cluster holding most of the domain's training tokens (ties: lowest id)."""
  return int(np.argmax(domain_histogram(run_data, domain, max_tokens)))


def expert_losses(config, run_data, eval_step, params, mesh, domain: str, num_experts: int,
                  max_tokens: int | None, batches: int, *, expert_params=None) -> np.ndarray:
  """Mean token loss of every expert on the first `batches` domain training batches.

  The batches are routed to expert c through their cluster column; or, with `expert_params`
  (c -> that expert's own params, e.g. a projected independent expert), `eval_step` runs on
  `expert_params(c)`.
  """
  it = pipeline.domain_iterator(config, run_data, domain, "train", max_tokens=max_tokens,
                                repeat=False, max_batches=batches,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  local_batches = list(it)
  losses = np.zeros(num_experts)
  for c in range(num_experts):
    total, count = 0.0, 0.0
    params_c = params if expert_params is None else expert_params(c)
    for local in local_batches:
      local = dict(local, cluster=np.full_like(local["cluster"], c))
      out = eval_step(params_c, mesh_lib.global_batch(local, mesh))
      total += float(out["loss_sum"])
      count += float(out["tokens"])
    losses[c] = total / max(count, 1.0)
  return losses
