"""Which expert a domain gets: its most frequent cluster, or the expert with the lowest loss.

Both look at the same limited domain training set the fine-tuning sees (the `max_tokens` prefix
of the shuffled split that batches.domain_batches uses), embedded with the pretraining run's
saved cluster model. The most frequent cluster is pipeline.domain_cluster(rule="budget") (token
weighted over that prefix, see pipeline.domain_histogram); the lowest loss is `expert_losses`.
"""

from __future__ import annotations

import jax
import numpy as np

from pn_jax.data import batches as batches_lib
from pn_jax.data import pipeline
from pn_jax.train import loop


def expert_losses(run_data: pipeline.RunData, eval_step, params, mesh, domain: str,
                  num_experts: int, max_tokens: int | None, batches: int, *, batch_size: int,
                  num_workers: int = 0, expert_params=None) -> np.ndarray:
  """Mean token loss of every expert on the first `batches` domain training batches.

  The batches are routed to expert c through their cluster column; or, with `expert_params`
  (c -> that expert's own params, e.g. a projected independent expert), `eval_step` runs on
  `expert_params(c)`.
  """
  it = batches_lib.domain_batches(run_data, domain, "train", batch_size=batch_size,
                                  max_tokens=max_tokens, repeat=False, max_batches=batches,
                                  num_workers=num_workers,
                                  shard=batches_lib.Shard(jax.process_index(), jax.process_count()))
  local_batches = list(it)
  losses = np.zeros(num_experts)
  for c in range(num_experts):
    params_c = params if expert_params is None else expert_params(c)
    routed = [dict(local, cluster=np.full_like(local["cluster"], c)) for local in local_batches]
    total, count = loop.summed_loss(eval_step, params_c, routed, mesh)
    losses[c] = total / max(count, 1.0)
  return losses
