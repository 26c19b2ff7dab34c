"""Token arrays -> packed sequences (pipeline.py's module doc gives the packing contract).

A tokenized document is its tokens followed by eos; its clustering windows are non-overlapping
cuts of at most `window` tokens; `pack` concatenates each cluster's windows behind one bos and cuts
views of T + 1 tokens at stride T, so every token after the bos is a target exactly once. No run
state: pipeline.py decides which windows go to which cluster and caches the result.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pn_jax.data import tokenizer as tok_lib


@dataclasses.dataclass
class Packed:
  """Sequences as (start, end) views into one token array; `cluster` per sequence."""
  tokens: np.ndarray  # int32 [N_tokens]
  starts: np.ndarray  # int64 [S]
  ends: np.ndarray  # int64 [S] exclusive, end - start in [2, T + 1]
  cluster: np.ndarray  # int32 [S]

  def __len__(self):
    return len(self.starts)

  @property
  def num_targets(self) -> int:
    return int((self.ends - self.starts - 1).sum())


def tokenize_docs(tokenizer: tok_lib.Tokenizer, texts: list[str]) -> list[np.ndarray]:
  """One int32 array per document: its tokens followed by eos."""
  out = []
  for i in range(0, len(texts), 2048):
    for ids in tokenizer.encode_batch(texts[i:i + 2048]):
      out.append(np.asarray(list(ids) + [tokenizer.eos_id], np.int32))
  return out


def windows_of(docs: list[np.ndarray], window: int) -> list[np.ndarray]:
  """Non-overlapping windows of at most `window` tokens, never crossing a document."""
  return [d[i:i + window] for d in docs for i in range(0, len(d), window)]


def pack(windows: list[np.ndarray], cluster: np.ndarray, seq_len: int, bos_id: int,
         num_clusters: int) -> Packed:
  """Concatenates each cluster's windows (corpus order) behind a bos; cuts T+1 views, stride T."""
  cluster = np.asarray(cluster, np.int32)
  pieces, starts, ends, seq_cluster, offset = [], [], [], [], 0
  for c in range(num_clusters):
    members = np.flatnonzero(cluster == c)
    if not len(members):
      continue
    stream = np.concatenate([np.array([bos_id], np.int32)] + [windows[i] for i in members])
    s = np.arange(0, len(stream) - 1, seq_len, dtype=np.int64)
    starts.append(offset + s)
    ends.append(offset + np.minimum(s + seq_len + 1, len(stream)))
    seq_cluster.append(np.full(len(s), c, np.int32))
    pieces.append(stream)
    offset += len(stream)
  if not pieces:
    return Packed(np.zeros((0,), np.int32), np.zeros((0,), np.int64), np.zeros((0,), np.int64),
                  np.zeros((0,), np.int32))
  return Packed(np.concatenate(pieces), np.concatenate(starts), np.concatenate(ends),
                np.concatenate(seq_cluster))


def pack_stream(docs: list[np.ndarray], seq_len: int, bos_id: int, cluster: int) -> Packed:
  """One stream for a whole (domain) set, every sequence carrying `cluster`."""
  packed = pack(docs, np.zeros(len(docs), np.int32), seq_len, bos_id, 1)
  return dataclasses.replace(packed, cluster=np.full(len(packed.starts), cluster, np.int32))
