"""SLM-is's sampler: generic training sequences resampled towards a domain (modes/importance.py).

The generic training sequences are clustered as for PN (config.model.k clusters; the dense model
ignores the ids). With P(c | domain) the share of the domain's training tokens in cluster c and
P(c | generic) the share of generic sequences, sequence s is drawn with probability proportional
to w(c_s) = P(c_s | domain) / P(c_s | generic), so the resampled set has the domain's cluster
histogram. Batches are i.i.d. draws with replacement, seeded by (seed, step): the grain iterator's
state is the step, so resuming is exact like the generic pipeline.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from pn_jax.config import ConfigError
from pn_jax.data import pipeline


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


class ImportanceBatches:
  """Random-access source: step -> local batch of `batch_size` weighted draws."""

  def __init__(self, packed: pipeline.Packed, probs: np.ndarray, *, batch_size: int, seq_len: int,
               pad_id: int, seed: int, process_index: int, process_count: int):
    self.packed, self.probs = packed, probs
    self.cdf = np.cumsum(probs)
    self.b, self.t, self.pad_id, self.seed = batch_size, seq_len, pad_id, seed
    self.lo = process_index * (batch_size // process_count)
    self.hi = self.lo + batch_size // process_count

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, step: int):
    u = np.random.default_rng([self.seed, int(step)]).random(self.b)
    rows = np.minimum(np.searchsorted(self.cdf, u * self.cdf[-1], side="right"),
                      len(self.cdf) - 1).astype(np.int64)
    return pipeline.make_batch(self.packed, rows[self.lo:self.hi], self.t, self.pad_id)


def importance_iterator(config, run_data, probs, *, process_index=0, process_count=1):
  source = ImportanceBatches(run_data.train, probs, batch_size=int(config.data.batch_size),
                             seq_len=run_data.seq_len, pad_id=run_data.tokenizer.pad_id,
                             seed=int(config.seed), process_index=process_index,
                             process_count=process_count)
  ds = grain.MapDataset.source(source).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  return iter(ds)
