"""Batches of a run's packed sequences, and the grain iterators over them.

Batching (per step, deterministic in (seed, epoch), no state but the step index):
  homogeneous  each cluster's sequences are shuffled and cut into global batches of B (the last one
               padded with empty rows, mask 0), then all batches are shuffled: every global batch
               holds one cluster, and clusters are visited in proportion to their size.
  mixed        all sequences shuffled and cut into global batches.
  stratified   (independent experts) slot c of every batch, rows [c*b, (c+1)*b) with b = B/k,
               holds cluster c. Training: row j of slot c at step s is index i = s*b + j of
               cluster c's own stream of shuffled epochs (epoch i // n_c, reshuffled with a seed
               from (seed, c, epoch)), so each expert sees all its cluster's sequences and small
               clusters repeat more epochs; a cluster without sequences is a DataError. Finite
               passes (eval): each cluster's sequences once, b per batch, padding rows (mask 0,
               the slot's cluster) where a cluster runs out.
Each process reads rows [p * B/P, (p+1) * B/P) of each global batch (its `Shard`), so processes
agree on the step's cluster, their shards are disjoint and together cover the batch.
Iterators (train_batches, eval_batches, domain_batches, importance_batches) take explicit
arguments, which their callers read from their configs. Each is one `Batches` source (a plan
maps a global batch index to its rows: EpochPlan, StratifiedPlan, FixedPlan, ImportancePlan)
under one grain `MapDataset.source(...).to_iter_dataset()` (batch_iterator) whose state is the
next index: `get_state()` / `set_state()` resume on exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

import numpy as np

from pn_jax.data.errors import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import pipeline
from pn_jax.data.packing import Packed
from pn_jax.data.pipeline import RunData


def make_batch(packed: Packed, rows: np.ndarray, seq_len: int, pad_id: int,
               pad_cluster: int | np.ndarray = 0) -> dict[str, np.ndarray]:
  """rows: sequence ids, -1 for an empty (fully masked) row, whose cluster is `pad_cluster`
  (one id, or one per row)."""
  b = len(rows)
  inputs = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  mask = np.zeros((b, seq_len), np.float32)
  cluster = np.zeros((b,), np.int32) + np.asarray(pad_cluster, np.int32)
  for r, s in enumerate(rows):
    if s < 0:
      continue
    chunk = packed.tokens[packed.starts[s]:packed.ends[s]]
    n = len(chunk) - 1
    inputs[r, :n], targets[r, :n], mask[r, :n] = chunk[:-1], chunk[1:], 1.0
    cluster[r] = packed.cluster[s]
  return {"inputs": inputs, "targets": targets, "mask": mask, "cluster": cluster}


def batch_plan(cluster: np.ndarray, batch_size: int, mode: str,
               rng: np.random.Generator | None, num_clusters: int = 0) -> np.ndarray:
  """int64 [num_batches, batch_size] of sequence ids (-1 = empty row); see the module doc.

  `num_clusters` (k) is needed by mode 'stratified' only (the finite pass).
  """
  cluster = np.asarray(cluster)
  perm = (lambda a: rng.permutation(a)) if rng is not None else (lambda a: a)

  def cut(ids, size=batch_size, rows=None):
    rows = -(-len(ids) // size) if rows is None else rows
    ids = np.concatenate([ids, np.full(rows * size - len(ids), -1, np.int64)])
    return ids.reshape(-1, size)

  if mode == "mixed":
    return cut(perm(np.arange(len(cluster), dtype=np.int64)))
  if mode == "stratified":
    b = _rows_per_expert(batch_size, num_clusters)
    members = [perm(np.flatnonzero(cluster == c).astype(np.int64)) for c in range(num_clusters)]
    n = max(-(-len(m) // b) for m in members)
    return np.concatenate([cut(m, b, n) for m in members], axis=1)  # [n, k * b]
  if mode != "homogeneous":
    raise DataError(f"unknown config.data.cluster_batching {mode!r}; use 'homogeneous', 'mixed' "
                    "or 'stratified'")
  groups = [cut(perm(np.flatnonzero(cluster == c).astype(np.int64)))
            for c in np.unique(cluster)]
  plan = np.concatenate(groups) if groups else np.zeros((0, batch_size), np.int64)
  return plan[perm(np.arange(len(plan)))] if len(plan) else plan


def _rows_per_expert(batch_size: int, num_clusters: int) -> int:
  if num_clusters < 1 or batch_size % num_clusters:
    raise DataError(f"stratified batches split config.data.batch_size={batch_size} evenly between "
                    f"k={num_clusters} clusters; use a multiple of config.model.k")
  return batch_size // num_clusters


def stratified_clusters(batch_size: int, num_clusters: int) -> np.ndarray:
  """int32 [batch_size]: the cluster of each row of a stratified batch (slot c = cluster c)."""
  b = _rows_per_expert(batch_size, num_clusters)
  return np.repeat(np.arange(num_clusters, dtype=np.int32), b)


# --- batch plans: global batch index -> its rows --------------------------------------------------

class _RecentEpochs:
  """Each stream's latest two epoch orders, built on demand; grain's reader threads share them
  under a lock. Pickles empty (grain's worker processes rebuild what they read)."""

  def __init__(self):
    self._lock, self._epochs = threading.Lock(), {}

  def get(self, stream, epoch: int, build) -> np.ndarray:
    with self._lock:
      if (stream, epoch) not in self._epochs:
        self._epochs = {(s, e): v for (s, e), v in self._epochs.items()
                        if s != stream or e == epoch - 1}
        self._epochs[(stream, epoch)] = build()
      return self._epochs[(stream, epoch)]

  def __getstate__(self):
    return {}

  def __setstate__(self, state):
    self.__init__()


class EpochPlan:
  """Endless: epochs of batch_plan(mode), each reshuffled with (seed, epoch). Padding rows (last
  in their batch) carry the cluster of the batch's first row."""

  def __init__(self, cluster: np.ndarray, batch_size: int, mode: str, seed: int):
    self.cluster, self.b, self.mode, self.seed = cluster, batch_size, mode, seed
    self.num_batches = len(batch_plan(cluster, batch_size, mode, None))
    self.epochs = _RecentEpochs()

  def __len__(self):
    return sys.maxsize

  def __call__(self, step: int) -> tuple[np.ndarray, int]:
    epoch, j = divmod(step, self.num_batches)
    rows = self.epochs.get(None, epoch, lambda: batch_plan(
        self.cluster, self.b, self.mode, np.random.default_rng([self.seed, epoch])))[j]
    return rows, int(self.cluster[rows[0]])


class StratifiedPlan:
  """Endless stratified batches (module doc): slot c, row j at step s is position s*b + j of
  cluster c's own stream of epochs, each shuffled with (seed, c, epoch)."""

  def __init__(self, cluster: np.ndarray, batch_size: int, num_clusters: int, seed: int):
    self.b, self.seed = _rows_per_expert(batch_size, num_clusters), seed
    self.members = [np.flatnonzero(cluster == c) for c in range(num_clusters)]
    empty = [c for c, m in enumerate(self.members) if not len(m)]
    if empty:
      raise DataError(f"clusters {empty} of the training set hold no sequence, so their "
                      "independent experts could never train: use a larger corpus or a smaller "
                      "config.model.k")
    self.epochs = _RecentEpochs()

  def __len__(self):
    return sys.maxsize

  def order(self, c: int, epoch: int) -> np.ndarray:
    """Cluster c's sequence ids in its epoch `epoch`."""
    def build():
      rng = np.random.default_rng([self.seed, c, epoch])
      return self.members[c][rng.permutation(len(self.members[c]))]
    return self.epochs.get(c, epoch, build)

  def __call__(self, step: int) -> tuple[np.ndarray, int]:
    rows = []
    for c, members in enumerate(self.members):
      epoch, pos = np.divmod(step * self.b + np.arange(self.b), len(members))
      rows.append([self.order(c, int(e))[p] for e, p in zip(epoch, pos)])
    return np.concatenate(rows).astype(np.int64), 0


class FixedPlan:
  """Finite: the rows of a precomputed plan [num_batches, B]. Padding rows get `pad_clusters`
  (int32 [B]; stratified: the slot's cluster), or else the batch's first row's cluster."""

  def __init__(self, plan: np.ndarray, cluster: np.ndarray,
               pad_clusters: np.ndarray | None = None):
    self.plan, self.cluster, self.pad_clusters = plan, cluster, pad_clusters

  def __len__(self):
    return len(self.plan)

  def __call__(self, j: int) -> tuple[np.ndarray, int | np.ndarray]:
    rows = self.plan[j]
    if self.pad_clusters is not None:
      return rows, self.pad_clusters
    return rows, int(self.cluster[rows[0]])


class ImportancePlan:
  """Endless: `batch_size` i.i.d. draws (with replacement) of sequence ids with probabilities
  `probs`, seeded by (seed, step)."""

  def __init__(self, probs: np.ndarray, batch_size: int, seed: int):
    self.cdf, self.b, self.seed = np.cumsum(probs), batch_size, seed

  def __len__(self):
    return sys.maxsize

  def __call__(self, step: int) -> tuple[np.ndarray, int]:
    u = np.random.default_rng([self.seed, step]).random(self.b)
    rows = np.minimum(np.searchsorted(self.cdf, u * self.cdf[-1], side="right"),
                      len(self.cdf) - 1).astype(np.int64)
    return rows, 0


# --- batches and their grain iterator -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shard:
  """Which block of every global batch this process loads (distributed.data_shard's answer):
  rows [process_index * B/P, (process_index + 1) * B/P) with P = process_count."""
  process_index: int = 0
  process_count: int = 1

  def rows(self, batch_size: int) -> tuple[int, int]:
    """(lo, hi) of this process's rows; a DataError if B is not a multiple of P."""
    if self.process_count < 1 or batch_size % self.process_count:
      raise DataError(f"config.data.batch_size={batch_size} is not divisible by process_count="
                      f"{self.process_count}; use a multiple of the number of hosts")
    local = batch_size // self.process_count
    return self.process_index * local, (self.process_index + 1) * local


class Batches:
  """Random-access source: index -> this process's rows [lo, hi) of global batch `index` of
  `plan` (one of the plans above), as {inputs, targets, mask, cluster}."""

  def __init__(self, packed: Packed, plan, *, seq_len: int, pad_id: int, batch_size: int,
               shard: Shard):
    self.packed, self.plan, self.t, self.pad_id = packed, plan, seq_len, pad_id
    self.lo, self.hi = shard.rows(batch_size)

  def __len__(self):
    return len(self.plan)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rows, pad = self.plan(int(index))
    if isinstance(pad, np.ndarray):
      pad = pad[self.lo:self.hi]
    return make_batch(self.packed, rows[self.lo:self.hi], self.t, self.pad_id, pad)


def batch_iterator(source: Batches, *, num_workers: int = 0):
  """The grain iterator over `source`: its state is the next index, so get_state/set_state
  resume exactly. num_workers > 0 reads in grain worker processes, which read absl flags: the
  CLIs (absl apps) have parsed them; a library caller parses them first."""
  import grain
  ds = grain.MapDataset.source(source).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      raise DataError(f"config.data.num_workers={num_workers} starts grain worker processes, "
                      "which need absl flags parsed: run through an absl app (python -m "
                      "pn_jax.main does it), call absl.flags.FLAGS(sys.argv[:1]) first, or set "
                      "config.data.num_workers=0")
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def _check_enough(packed: Packed, batch_size: int, seq_len: int, what: str):
  if len(packed) < batch_size:
    raise DataError(f"{what} holds {packed.num_targets:,} target tokens = {len(packed)} sequences "
                    f"of seq_len={seq_len}, fewer than one global batch of "
                    f"{batch_size}: lower config.data.batch_size / seq_len or use a larger corpus")


def _batches(run_data: RunData, packed: Packed, plan, batch_size: int, shard: Shard,
             num_workers: int):
  source = Batches(packed, plan, seq_len=run_data.seq_len, pad_id=run_data.tokenizer.pad_id,
                   batch_size=batch_size, shard=shard)
  return batch_iterator(source, num_workers=num_workers)


# --- the iterators a mode asks for ---------------------------------------------------------------

def train_batches(run_data: RunData, *, batch_size: int, mode: str, seed: int,
                  shard: Shard = Shard(), num_workers: int = 0):
  """Infinite grain iterator of this process's batches of the generic training set; `mode` is
  config.data.cluster_batching (module doc)."""
  shard.rows(batch_size)
  _check_enough(run_data.train, batch_size, run_data.seq_len,
                f"the training set of corpus {run_data.root!r}")
  cluster = run_data.train.cluster
  if mode == "stratified":
    plan = StratifiedPlan(cluster, batch_size, run_data.num_clusters, seed)
  else:
    plan = EpochPlan(cluster, batch_size, mode, seed)
  return _batches(run_data, run_data.train, plan, batch_size, shard, num_workers)


def eval_batches(run_data: RunData, *, split: str, batch_size: int, max_batches: int,
                 mode: str = "mixed", domain: str = "", shard: Shard = Shard(),
                 num_workers: int = 0):
  """Finite: at most `max_batches` batches of held-out generic text (batched by `mode`), or of
  `domain`'s split (one ordered pass, see domain_batches)."""
  if domain:
    return domain_batches(run_data, domain, split, batch_size=batch_size, repeat=False,
                          max_batches=max_batches, shard=shard, num_workers=num_workers)
  shard.rows(batch_size)
  packed = pipeline.packed_split(run_data, split)
  if not len(packed):
    raise DataError(f"split {split!r} of {run_data.root!r} has no tokens to evaluate")
  k = run_data.num_clusters
  plan = batch_plan(packed.cluster, batch_size, mode, np.random.default_rng(pipeline.EVAL_SEED),
                    num_clusters=k)[:max_batches]
  pad = stratified_clusters(batch_size, k) if mode == "stratified" else None
  return _batches(run_data, packed, FixedPlan(plan, packed.cluster, pad), batch_size, shard,
                  num_workers)


def domain_batches(run_data: RunData, domain: str, split: str = "train", *, batch_size: int,
                   seed: int | None = None, max_tokens: int | None = None,
                   repeat: bool | None = None, max_batches: int | None = None,
                   shard: Shard = Shard(), num_workers: int = 0):
  """A specialization domain's split, every sequence tagged with pipeline.domain_cluster(domain).

  `max_tokens` keeps a fixed (seed-independent, nested: 1M is a prefix of 8M) subset of the split.
  `repeat` (default: split == "train") gives an infinite iterator, each epoch reshuffled with
  (seed, epoch); otherwise one ordered pass of at most `max_batches` batches.
  """
  if not domain:
    raise DataError("domain_batches needs a domain name (config.data.domain); available: "
                    f"{corpus_lib.list_domains(run_data.root)}")
  shard.rows(batch_size)
  packed = pipeline.packed_split(run_data, split, domain, max_tokens)
  if not len(packed):
    raise DataError(f"domain {domain!r} split {split!r} has no tokens (max_tokens={max_tokens})")
  if repeat is None:
    repeat = split == "train"
  if repeat:
    if seed is None:
      raise ValueError("domain_batches(repeat=True) reshuffles every epoch: pass its seed")
    _check_enough(packed, batch_size, run_data.seq_len, f"domain {domain!r} split {split!r}")
    plan = EpochPlan(packed.cluster, batch_size, "mixed", seed)
  else:
    plan = FixedPlan(batch_plan(packed.cluster, batch_size, "mixed", None)[:max_batches],
                     packed.cluster)
  return _batches(run_data, packed, plan, batch_size, shard, num_workers)


def importance_batches(run_data: RunData, probs: np.ndarray, *, batch_size: int, seed: int,
                       shard: Shard = Shard(), num_workers: int = 0):
  """Infinite: generic training sequences drawn i.i.d. with probabilities `probs` [S] (SLM-is)."""
  plan = ImportancePlan(probs, batch_size, seed)
  return _batches(run_data, run_data.train, plan, batch_size, shard, num_workers)

