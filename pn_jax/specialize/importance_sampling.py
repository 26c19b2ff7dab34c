"""SLM-is's sampler: generic training sequences resampled towards a domain (modes/importance.py).

The generic training sequences are clustered as for PN (config.model.k clusters; the dense model
ignores the ids). With P(c | domain) the share of the domain's training tokens in cluster c and
P(c | generic) the share of generic sequences, sequence s is drawn with probability proportional
to w(c_s) = P(c_s | domain) / P(c_s | generic), so the resampled set has the domain's cluster
histogram. Batches are i.i.d. draws with replacement, seeded by (seed, step): the grain iterator's
state is the step, so resuming is exact like the generic pipeline (batches.importance_batches).
"""

from __future__ import annotations

import numpy as np

from pn_jax.config import ConfigError


def sequence_probs(seq_cluster: np.ndarray, domain_hist: np.ndarray) -> tuple[np.ndarray, dict]:
  """Per-sequence sampling probabilities and the cluster weights w(c)."""
  k = len(domain_hist)
  generic = np.bincount(seq_cluster, minlength=k).astype(np.float64)
  generic /= generic.sum()
  w = np.where(generic > 0, domain_hist / np.maximum(generic, 1e-300), 0.0)
  if not (w[seq_cluster] > 0).any():
    raise ConfigError("the domain's clusters hold no generic sequences: nothing to resample")
  p = w[seq_cluster]
  p = p / p.sum()
  ess = 1.0 / float(np.sum(p * p))  # effective number of distinct sequences drawn from
  return p, {"weights": w.round(4).tolist(), "generic_hist": generic.round(4).tolist(),
             "domain_hist": np.asarray(domain_hist).round(4).tolist(), "ess_sequences": ess}


