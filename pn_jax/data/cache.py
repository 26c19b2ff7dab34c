"""Content-addressed store of data-preparation artefacts, shared by the runs of an experiment.

Preparing a run's data is a chain of stages, each a pure function of its inputs:

  docs      a split's documents, tokenized (the generic train  <- split file content, tokenizer
            split; domain and held-out splits for later stages)
  embed     the clustering windows' embeddings (+ the fitted   <- docs, window, embedding kind,
            TF-IDF/SVD arrays and the fit sample's rows)          dim, seed (the fit sample)
  clusters  k-means centroids and every window's assignment    <- embed, k, seed
  packed    the packed training sequences and their stats      <- clusters, seq_len

A stage's key hashes its inputs (the previous stage's key included), so two runs of an experiment
with different k share `docs` and `embed`, and two with the same k share everything. Files are
`<directory>/<stage>-<key>.npz`, written to a temporary file and renamed, so a killed run never
leaves a half file under a final name; a file that cannot be read back (truncated, bad CRC,
missing arrays) is reported, deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import numpy as np

from pn_jax import storage

STAGES = ("docs", "embed", "clusters", "packed")


def content_id(path: str) -> str:
  """sha256 of a file's bytes (a 137 MB split hashes in ~0.3 s): copies share a key, edits don't."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()[:32]


def key(*parts) -> str:
  """A stage key: the hash of its inputs (JSON-serialisable values)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class ArtefactStore:
  """npz artefacts under one directory, for the stages in `keep` (others are neither read nor
  written: a workdir without config.data.cache_dir keeps only its packed set, as before).
  `write=False` (a follower process) reads what exists and writes nothing."""

  def __init__(self, directory: str, keep=STAGES, write: bool = True):
    unknown = set(keep) - set(STAGES)
    if unknown:
      raise ValueError(f"unknown artefact stages {sorted(unknown)}; known: {STAGES}")
    self.directory, self.keep, self.write = directory, tuple(keep), write

  def path(self, stage: str, stage_key: str) -> str:
    return os.path.join(self.directory, f"{stage}-{stage_key}.npz")

  def load(self, stage: str, stage_key: str, fields: tuple[str, ...]) -> dict | None:
    """The stage's arrays, or None when absent (or unreadable: then the file is deleted)."""
    if stage not in self.keep:
      return None
    path = self.path(stage, stage_key)
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as z:
        missing = [f for f in fields if f not in z.files]
        if missing:
          raise KeyError(f"missing arrays {missing}")
        return {f: z[f] for f in z.files}  # reading every member checks its CRC
    except Exception as e:  # BadZipFile, EOFError, ValueError, KeyError, OSError, ...
      print(f"pn_jax.data: cached artefact {path} is unreadable ({type(e).__name__}: {e}); "
            "deleting it and rebuilding", file=sys.stderr)
      if self.write:
        try:
          os.remove(path)
        except FileNotFoundError:
          pass
      return None

  def save(self, stage: str, stage_key: str, arrays: dict) -> None:
    """Atomically: a temporary file in the same directory, then os.replace."""
    if stage not in self.keep or not self.write:
      return
    os.makedirs(self.directory, exist_ok=True)
    path = self.path(stage, stage_key)
    fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{stage}-{stage_key}.",
                               suffix=".tmp.npz")
    with storage.writing(path, needed=sum(np.asarray(a).nbytes for a in arrays.values()),
                         temp=tmp):  # (removed on any failure; a full disk: OutOfSpace)
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
      os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
      os.replace(tmp, path)


def json_array(obj) -> np.ndarray:
  """A JSON document as a 0-d string array (npz without pickle)."""
  return np.array(json.dumps(obj, sort_keys=True, default=float))


def from_json_array(a: np.ndarray):
  return json.loads(str(a[()]))


def flatten_docs(docs: list[np.ndarray]) -> dict:
  """Documents as one int32 token array + lengths (one npz member each, fast to save/load)."""
  lens = np.array([len(d) for d in docs], np.int64)
  tokens = np.concatenate(docs).astype(np.int32) if docs else np.zeros((0,), np.int32)
  return {"tokens": tokens, "doc_lens": lens}


def unflatten_docs(arrays: dict) -> list[np.ndarray]:
  ends = np.cumsum(arrays["doc_lens"])
  return np.split(arrays["tokens"], ends[:-1]) if len(ends) else []
