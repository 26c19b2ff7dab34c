"""Run data: tokenizer + clusters + packed sequences, and the grain iterators over them.

Packing (done once per run, cached under `<workdir>/data/`):
  1. every generic training document is tokenized and followed by eos;
  2. its tokens are cut into non-overlapping windows of `cluster_window` tokens (default seq_len;
     the paper uses 1,024), each window is embedded and assigned to its k-means cluster;
  3. per cluster c, the windows are concatenated in corpus order behind one bos, giving a stream
     S_c; sequence j of cluster c is S_c[jT : jT + T + 1] (inputs = [:-1], targets = [1:]), so
     every token of S_c after the bos is a target exactly once, and each sequence has one cluster.
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
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

from pn_jax.data.errors import DataError
from pn_jax.data import cache as cache_lib
from pn_jax.data import clusters as clusters_lib
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import provenance
from pn_jax.data import tokenizer as tok_lib

FORMAT_VERSION = 2
EVAL_SEED = 1234  # eval/domain subsets do not depend on the run seed: comparable across runs


# --- packed sequences ------------------------------------------------------------------------------

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


# --- run data ------------------------------------------------------------------------------------

class Memo:
  """What a RunData derives once and reuses (tokenized splits, packed eval splits, domain
  histograms), keyed by the arguments that define it; one per RunData, so two runs never share."""

  def __init__(self):
    self._values = {}

  def get(self, key: tuple, build):
    """build()'s result for `key`, computed on the first call."""
    if key not in self._values:
      self._values[key] = build()
    return self._values[key]


@dataclasses.dataclass
class RunData:
  """A run's tokenizer and routing, and (training modes only) its packed generic training set.

  prepare_run_data (pretraining) builds or loads everything; load_run_data (specialize, eval,
  expert selection) loads only the tokenizer and clusters: `train` then raises, so a mode that
  never trains on generic data cannot pay for reading it by accident.
  """
  tokenizer: tok_lib.Tokenizer
  num_clusters: int
  clusters: clusters_lib.ClusterModel
  root: str  # prepared corpus root
  workdir: str
  seq_len: int
  window: int
  stats: dict  # documents / windows / tokens / cluster sizes of the training set ({}: unknown)
  store: cache_lib.ArtefactStore  # where tokenized splits are cached (see split_docs)
  train_set: Packed | None = None
  memo: Memo = dataclasses.field(default_factory=Memo, repr=False)

  @property
  def train(self) -> Packed:
    if self.train_set is None:
      raise DataError(f"the run data of {self.workdir!r} was loaded without its packed generic "
                      "training set (load_run_data: specialize/eval need only the tokenizer and "
                      "clusters); use prepare_run_data to train on generic data")
    return self.train_set


def data_settings(config) -> dict:
  """The config values a prepared workdir's data depends on (READY.json's "settings")."""
  d = config.data
  return {"format": FORMAT_VERSION, "corpus": str(d.corpus), "tokenizer": str(d.tokenizer),
          "tokenizer_path": str(d.tokenizer_path), "vocab_size": int(config.model.vocab_size),
          "seq_len": int(d.seq_len), "window": _window(config), "k": int(config.model.k),
          "embedding": str(d.cluster_embedding), "seed": int(config.seed),
          "cluster_dim": int(d.get("cluster_dim", 64))}


def _window(config) -> int:
  return int(config.data.get("cluster_window", 0) or config.data.seq_len)


def _store(config, workdir: str, write: bool) -> cache_lib.ArtefactStore:
  """config.data.cache_dir: every stage, shared by the runs that point there; else only the
  packed set, under <workdir>/data (the behaviour before the cache existed)."""
  cache_dir = config.data.get("cache_dir", "") or ""
  if cache_dir:
    return cache_lib.ArtefactStore(cache_dir, write=write)
  return cache_lib.ArtefactStore(os.path.join(workdir, "data"), keep=("packed",), write=write)


def _workers(config) -> int:
  return int(config.data.get("prep_workers", 0) or os.cpu_count() or 1)


def _load_or_train_tokenizer(config, root: str, workdir: str, write: bool,
                             corpus: dict | None = None) -> tok_lib.Tokenizer:
  """The run's tokenizer. `corpus` (provenance.corpus_identity; given by the process that
  builds the run's data) checks a workdir's trained tokenizer against what the config asks for,
  or records it next to a newly trained one; readers (write=False) take the file as it is."""
  d = config.data
  if d.tokenizer == "byte":
    tok = tok_lib.byte_tokenizer()
  elif d.tokenizer != "sentencepiece":
    raise DataError(f"unknown config.data.tokenizer {d.tokenizer!r}; use 'sentencepiece' or "
                    "'byte'")
  elif d.tokenizer_path:
    tok = tok_lib.load_tokenizer(d.tokenizer_path)
  else:
    path = os.path.join(workdir, "tokenizer.model")
    inputs = provenance.tokenizer_inputs(config, corpus) if write and corpus else None
    if os.path.exists(path) or not write:
      tok = tok_lib.load_tokenizer(path)
      if inputs is not None:
        provenance.check_tokenizer(workdir, inputs, tok.fingerprint())
    else:
      tok = _train_tokenizer(config, root, path, inputs)
  if tok.vocab_size > config.model.vocab_size:
    raise DataError(f"tokenizer {tok.path!r} has {tok.vocab_size} ids but config.model.vocab_size"
                    f"={config.model.vocab_size}; raise vocab_size (>= {tok.vocab_size})")
  return tok


def _train_tokenizer(config, root: str, path: str, inputs: dict | None) -> tok_lib.Tokenizer:
  """Trains into a temporary file, records its inputs, then moves it into place: a tokenizer
  under its final name always has its record (a killed run leaves only the temporary file)."""
  texts = corpus_lib.load_texts(root, "train")
  order = np.random.default_rng(config.seed).permutation(len(texts))
  tmp = path + ".training"
  tok = tok_lib.train_tokenizer((texts[i] for i in order), tmp, int(config.model.vocab_size),
                                int(config.seed),
                                max_chars=int(config.data.get("tokenizer_sample_chars",
                                                              20_000_000)))
  if inputs is not None:
    provenance.write_tokenizer_record(os.path.dirname(path), inputs, tok.fingerprint())
  os.replace(tmp, path)
  return tok_lib.load_tokenizer(path)


def _split_file(root: str, split: str, domain: str = "") -> str:
  """The split's file; the DataError of load_texts (naming the file or domain) if unusable."""
  path = corpus_lib.existing_split_file(corpus_lib.split_path(root, split, domain))
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    corpus_lib.load_texts(root, split, domain)  # raises, naming what is missing
  return path


def _docs_key(root: str, split: str, domain: str, tok: tok_lib.Tokenizer) -> str:
  source = cache_lib.content_id(_split_file(root, split, domain))
  return cache_lib.key("docs", FORMAT_VERSION, source, tok.fingerprint())


def _cached_docs(store, root: str, split: str, domain: str,
                 tok: tok_lib.Tokenizer) -> tuple[list[np.ndarray], str]:
  """-> (a split's tokenized documents in file order, their key), through the store."""
  key = _docs_key(root, split, domain, tok)
  hit = store.load("docs", key, ("tokens", "doc_lens"))
  if hit is not None:
    return cache_lib.unflatten_docs(hit), key
  docs = tokenize_docs(tok, corpus_lib.load_texts(root, split, domain))
  store.save("docs", key, cache_lib.flatten_docs(docs))
  return docs, key


def split_docs(run_data: RunData, split: str, domain: str = "") -> list[np.ndarray]:
  """A split's tokenized documents in file order. Cached by (file content, tokenizer) in the
  run's store, so the specialization cells of an experiment (each a separate mode call, with its
  own RunData) tokenize each domain split once; without config.data.cache_dir, once per RunData."""
  return run_data.memo.get(("docs", split, domain), lambda: _cached_docs(
      run_data.store, run_data.root, split, domain, run_data.tokenizer)[0])


def window_clusters(clusters: clusters_lib.ClusterModel, tokenizer: tok_lib.Tokenizer,
                    windows: list[np.ndarray]) -> np.ndarray:
  """int32 [W]: each token window's cluster. The cluster model embeds text, so the windows go
  back to text first: the one place that round trip happens (callers cache the result)."""
  return clusters.assign(tokenizer.decode_batch(windows))


def _embed_windows(config, store, wins, docs_key, tok, progress) -> tuple:
  """-> (embedding model without centroids, float32 [W, dim] embeddings of every window,
  rows the fit used, stage key). Decoding windows back to text is needed only on a miss."""
  d, seed = config.data, int(config.seed)
  embedding, dim = str(d.cluster_embedding), int(d.get("cluster_dim", 64))
  key = cache_lib.key("embed", docs_key, _window(config), embedding, dim, seed,
                      clusters_lib.MAX_FIT)
  hit = store.load("embed", key, ("x", "rows", "meta"))
  if hit is not None:
    meta = cache_lib.from_json_array(hit.pop("meta"))
    x, rows = hit.pop("x"), hit.pop("rows")
    return clusters_lib.ClusterModel(embedding, np.zeros((0, x.shape[1]), np.float32), hit,
                                     meta), x, rows, key
  t0 = time.time()
  texts = tok.decode_batch(wins)
  t1 = time.time()
  rows = clusters_lib.fit_rows(texts, seed)
  clusters_lib.check_k(int(config.model.k), len(rows))
  model, x_fit = clusters_lib.fit_embedding([texts[i] for i in rows], seed, embedding=embedding,
                                            dim=dim)
  t2 = time.time()
  x = np.empty((len(texts), x_fit.shape[1]), np.float32)
  x[rows] = x_fit  # the fit sample is embedded by the fit itself
  rest = np.setdiff1d(np.arange(len(texts)), rows)  # beyond the 50k sample, or blank
  if len(rest):
    x[rest] = clusters_lib.embed_many(model, [texts[i] for i in rest], workers=_workers(config))
  if progress:
    print(f"pn_jax.data: embedded {len(wins):,} windows: decode {t1 - t0:.1f} s, fit "
          f"{embedding} {t2 - t1:.1f} s, embed {time.time() - t2:.1f} s", file=sys.stderr)
  store.save("embed", key, dict(model.arrays, x=x, rows=rows,
                                meta=cache_lib.json_array(model.meta)))
  return model, x, rows, key


def _fit_routing(config, store, x, rows, embed_key) -> tuple[np.ndarray, np.ndarray, str]:
  """-> (centroids, every window's cluster, stage key): k-means on the fit rows."""
  k, seed = int(config.model.k), int(config.seed)
  clusters_lib.check_k(k, len(rows))
  key = cache_lib.key("clusters", embed_key, k, seed)
  hit = store.load("clusters", key, ("centroids", "assignment"))
  if hit is not None:
    return hit["centroids"], hit["assignment"], key
  centroids = clusters_lib.fit_centroids(x[rows], k, seed)
  assignment = clusters_lib.nearest(x, centroids)
  store.save("clusters", key, {"centroids": centroids, "assignment": assignment})
  return centroids, assignment, key


def _saved_routing(cdir: str, expect: dict, corpus: dict) -> clusters_lib.ClusterModel | None:
  """The run's own clusters/ (None if absent), checked against the config and the corpus
  (provenance.py) before any work: a workdir's clusters define a trained model's routing and
  are never refitted."""
  if not os.path.exists(os.path.join(cdir, "meta.json")):
    return None
  saved = clusters_lib.load_clusters(cdir)
  provenance.check_clusters(cdir, os.path.dirname(cdir), saved.meta.get("corpus"), corpus)
  got = {k: saved.meta.get(k) for k in expect}
  got["k"], got["embedding"] = saved.k, saved.embedding
  if got != expect:
    raise DataError(f"{cdir} holds clusters for {got} but the config asks for {expect}; use a "
                    "fresh --workdir (clusters define the routing of a trained model)")
  return saved


def _same_model(a: clusters_lib.ClusterModel, b: clusters_lib.ClusterModel) -> bool:
  return (np.array_equal(a.centroids, b.centroids) and a.arrays.keys() == b.arrays.keys()
          and all(np.array_equal(a.arrays[n], b.arrays[n]) for n in a.arrays))


def build_training_set(config, root: str, workdir: str, tok, store, progress: bool,
                       corpus: dict) -> tuple:
  """Tokenize, window, embed, cluster, pack the generic training set, each stage through the
  store (cache.py); -> (the run's cluster model, packed set, stats)."""
  k, seed, window = int(config.model.k), int(config.seed), _window(config)
  cdir = os.path.join(workdir, "clusters")
  saved = _saved_routing(cdir, {"k": k, "embedding": str(config.data.cluster_embedding),
                                "window": window, "tokenizer": tok.fingerprint(), "seed": seed},
                         corpus)
  t0 = time.time()
  docs, docs_key = _cached_docs(store, root, "train", "", tok)
  wins = windows_of(docs, window)
  emb, x, rows, embed_key = _embed_windows(config, store, wins, docs_key, tok, progress)
  centroids, assignment, routing_key = _fit_routing(config, store, x, rows, embed_key)
  fitted = clusters_lib.with_centroids(emb, centroids, embedding=emb.embedding, window=window,
                                       tokenizer=tok.fingerprint(), seed=seed, corpus=corpus)
  model = fitted if saved is None else saved
  if saved is not None and not _same_model(saved, fitted):
    # fitted by an earlier build (other code): the run keeps its routing, the cache is bypassed
    assignment = window_clusters(saved, tok, wins)
    routing_key = cache_lib.key("workdir-clusters", hashlib.sha256(assignment).hexdigest())
  key = cache_lib.key("packed", routing_key, int(config.data.seq_len), tok.bos_id)
  hit = _load_packed(store, key)
  if hit is not None:
    packed, stats = hit
  else:
    packed = pack(wins, assignment, int(config.data.seq_len), tok.bos_id, k)
    stats = {"documents": len(docs), "windows": len(wins), "tokens": int(sum(map(len, docs))),
             "sequences": len(packed),
             "cluster_windows": clusters_lib.cluster_sizes(assignment, k),
             "cluster_tokens": np.bincount(assignment, weights=[len(w) for w in wins],
                                           minlength=k).astype(int).tolist(),
             "cluster_sequences": clusters_lib.cluster_sizes(packed.cluster, k),
             "build_seconds": round(time.time() - t0, 2)}
    store.save("packed", key, {"tokens": packed.tokens, "starts": packed.starts,
                               "ends": packed.ends, "cluster": packed.cluster,
                               "stats": cache_lib.json_array(stats)})
  if saved is None and store.write:
    fitted.meta["train_stats"] = stats
    fitted.save(cdir)
  if progress:
    print(f"pn_jax.data: {stats['tokens']:,} tokens of {root} in {len(packed):,} sequences in "
          f"{k} clusters ({time.time() - t0:.1f} s; cache {store.directory})", file=sys.stderr)
  return model, packed, stats, key


def _load_packed(store, key: str) -> tuple[Packed, dict] | None:
  hit = store.load("packed", key, ("tokens", "starts", "ends", "cluster", "stats"))
  if hit is None:
    return None
  return (Packed(hit["tokens"], hit["starts"], hit["ends"], hit["cluster"]),
          cache_lib.from_json_array(hit["stats"]))


def _prepared(ready: str, expect: dict, store, cdir: str) -> tuple | None:
  """(clusters, packed, stats) of an earlier preparation of this workdir (a resumed run, or a
  follower process reading process 0's), if its READY.json matches settings and inputs."""
  try:
    with open(ready) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  if any(info.get(k) != v for k, v in expect.items()) or "packed" not in info:
    return None
  hit = _load_packed(store, info["packed"])
  if hit is None or not os.path.exists(os.path.join(cdir, "meta.json")):
    return None
  return (clusters_lib.load_clusters(cdir), *hit)


def _check_root(config) -> str:
  root = corpus_lib.resolve_root(config.data.corpus, config.data.data_dir)
  if not os.path.isdir(root):
    raise DataError(f"corpus {config.data.corpus!r} resolves to {root!r}, which does not exist: "
                    "run `python -m pn_jax.data prepare --out=<data_dir>` and set "
                    "config.data.data_dir, or use config.data.corpus='tiny'")
  return root


def prepare_run_data(config, workdir: str, *, process_index: int = 0,
                     wait_timeout_s: float = 3600.0, progress: bool = True) -> RunData:
  """Tokenizer + clusters + packed training sequences for this run (idempotent, cached).

  Process 0 builds (or takes from config.data.cache_dir) every artefact and writes the run's
  own tokenizer/clusters under `workdir`; other processes wait for its READY marker (written
  last) and then load the same files.
  """
  root = _check_root(config)
  os.makedirs(workdir, exist_ok=True)
  ready = _ready_file(workdir)
  settings = data_settings(config)
  if process_index != 0:
    deadline = time.time() + wait_timeout_s
    while True:
      if prepared_with(workdir, settings):
        break
      if time.time() > deadline:
        raise DataError(f"process {process_index} waited {wait_timeout_s:.0f} s for process 0 to "
                        f"write {ready}; check process 0's log, or that --workdir is on a "
                        "filesystem shared by all hosts")
      time.sleep(1.0)
  write = process_index == 0
  corpus = provenance.corpus_identity(root, _split_file(root, "train"))
  tok = _load_or_train_tokenizer(config, root, workdir, write=write, corpus=corpus)
  store = _store(config, workdir, write)
  source = corpus["train"]
  expect = {"settings": settings, "inputs": {"train": source, "tokenizer": tok.fingerprint()}}
  done = _prepared(ready, expect, store, os.path.join(workdir, "clusters"))
  if done is not None:
    model, packed, stats = done
  else:
    model, packed, stats, key = build_training_set(config, root, workdir, tok, store,
                                                   progress and write, corpus)
    if write:
      corpus_lib.write_json(ready, {**expect, "packed": key, "stats": stats})
  return RunData(tokenizer=tok, num_clusters=int(config.model.k), clusters=model, root=root,
                 workdir=workdir, seq_len=int(config.data.seq_len), window=_window(config),
                 stats=stats, store=store, train_set=packed)


def load_run_data(config, workdir: str) -> RunData:
  """A prepared run's tokenizer and clusters, without its packed generic training set: what
  specialization, evaluation and expert selection need. Builds nothing."""
  root = _check_root(config)
  tok = _load_or_train_tokenizer(config, root, workdir, write=False)
  model = clusters_lib.load_clusters(os.path.join(workdir, "clusters"))
  ready = _ready_file(workdir)
  stats = {}
  if os.path.exists(ready):
    with open(ready) as f:
      stats = json.load(f).get("stats", {})
  return RunData(tokenizer=tok, num_clusters=model.k, clusters=model, root=root, workdir=workdir,
                 seq_len=int(config.data.seq_len), window=_window(config), stats=stats,
                 store=_reading_store(config, workdir))


PREPARED_FILES = ("tokenizer.model", "tokenizer.provenance.json", "clusters", "data")


def _ready_file(workdir: str) -> str:
  """READY.json: written last by prepare_run_data, so its presence means the data is complete."""
  return os.path.join(workdir, "data", "READY.json")


def is_prepared(workdir: str) -> bool:
  """Whether prepare_run_data has completed in `workdir` (for any settings)."""
  return os.path.exists(_ready_file(workdir))


def prepared_with(workdir: str, settings: dict) -> bool:
  """Whether `workdir`'s data was prepared with these data_settings."""
  if not is_prepared(workdir):
    return False
  with open(_ready_file(workdir), encoding="utf-8") as f:
    return json.load(f).get("settings") == json.loads(json.dumps(settings))


def copy_prepared(src_workdir: str, dst_workdir: str) -> None:
  """Copies a prepared run's tokenizer, clusters and packed data (READY.json included) into
  another workdir: a run with the same data_settings then loads them instead of rebuilding."""
  os.makedirs(dst_workdir, exist_ok=True)
  for name in PREPARED_FILES:
    src, dst = os.path.join(src_workdir, name), os.path.join(dst_workdir, name)
    if os.path.isdir(src):
      shutil.copytree(src, dst, dirs_exist_ok=True)
    elif os.path.exists(src):
      shutil.copy2(src, dst)


def _reading_store(config, workdir: str) -> cache_lib.ArtefactStore:
  """The store of a stage that reads a prepared run (specialize, eval): it never writes into
  that run, which may be archived or read-only. A cache_dir outside the run is shared by many
  runs and is filled when it can be written (a read-only one is only read, with a warning)."""
  cache_dir = config.data.get("cache_dir", "") or ""
  if not cache_dir:  # only <workdir>/data's packed set, which these stages never build
    return _store(config, workdir, write=False)
  run, cache = os.path.realpath(workdir), os.path.realpath(cache_dir)
  inside = cache == run or cache.startswith(run.rstrip("/") + "/")
  return _store(config, workdir, write=not inside and _can_write(cache_dir))


def _can_write(directory: str) -> bool:
  """Whether files can be created in `directory` (created if missing); a warning if not."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    print(f"pn_jax.data: cache {directory} is not writable ({e.strerror or e}): reading it "
          "without adding to it", file=sys.stderr)
    return False
  return True


def assign_clusters(run_data: RunData, texts: list[str]) -> np.ndarray:
  """Nearest cluster id (int32) of each whole text, through the run's saved embedding."""
  return run_data.clusters.assign(list(texts))


# --- domain sets and their clusters -------------------------------------------------------------

def domain_docs(run_data: RunData, domain: str, split: str,
                max_tokens: int | None = None) -> list[np.ndarray]:
  """A domain split's tokenized documents in a fixed (seed-independent) order, cut after
  `max_tokens` tokens: the 1M subset is a prefix of the 8M one. Shared by the domain batches
  and the expert choice (domain_histogram's 'budget' rule), so both see the same documents."""
  docs = split_docs(run_data, split, domain)
  order = np.random.default_rng(EVAL_SEED).permutation(len(docs))
  docs = [docs[i] for i in order]
  if max_tokens:
    kept, total = [], 0
    for d in docs:
      if total >= max_tokens:
        break
      kept.append(d[:max_tokens - total])
      total += len(kept[-1])
    docs = kept
  return docs


DOMAIN_RULES = ("split", "budget")


def domain_histogram(run_data: RunData, domain: str, *, rule: str,
                     max_tokens: int | None = None) -> np.ndarray:
  """float64 [k]: the share of a domain's training text in each cluster, by one of two rules.

  'split'   every clustering window of the whole train split counts once (max_tokens unused):
            the cluster that domain batches are tagged with, and that eval projects independent
            experts to (domain_cluster's default).
  'budget'  each window of the fine-tuning set (domain_docs' `max_tokens` prefix) weighs its
            tokens: expert choice (specialize.select = 'frequent') and importance sampling.
  The two can pick different clusters (window counts vs token weights, whole split vs prefix);
  both are kept because trained and reported runs depend on each. Memoized per RunData.
  """
  if rule not in DOMAIN_RULES:
    raise ValueError(f"domain_histogram rule {rule!r}; use one of {DOMAIN_RULES}")

  def build():
    if rule == "split":  # file order: the windows (and assign's batches) the tags always used
      wins, weights = windows_of(split_docs(run_data, "train", domain), run_data.window), None
    else:
      wins = windows_of(domain_docs(run_data, domain, "train", max_tokens), run_data.window)
      weights = [len(w) for w in wins]
    ids = window_clusters(run_data.clusters, run_data.tokenizer, wins)
    counts = np.bincount(ids, weights=weights, minlength=run_data.num_clusters)
    return counts / max(counts.sum(), 1.0)

  key = ("domain_histogram", domain, rule, None if rule == "split" else max_tokens)
  return run_data.memo.get(key, build)


def domain_cluster(run_data: RunData, domain: str, *, rule: str = "split",
                   max_tokens: int | None = None) -> int:
  """The domain's most frequent cluster under `rule` (see domain_histogram; ties: lowest id)."""
  return int(np.argmax(domain_histogram(run_data, domain, rule=rule, max_tokens=max_tokens)))


def packed_split(run_data: RunData, split: str, domain: str = "",
                 max_tokens: int | None = None) -> Packed:
  """Held-out generic text (packed per assigned cluster) or a domain split (one stream, tagged
  with domain_cluster). Memoized per RunData."""
  def build():
    tok = run_data.tokenizer
    if domain:
      docs = domain_docs(run_data, domain, split, max_tokens)
      return pack_stream(docs, run_data.seq_len, tok.bos_id, domain_cluster(run_data, domain))
    wins = windows_of(split_docs(run_data, split), run_data.window)
    ids = window_clusters(run_data.clusters, tok, wins)
    return pack(wins, ids, run_data.seq_len, tok.bos_id, run_data.num_clusters)
  return run_data.memo.get(("split", split, domain, max_tokens), build)


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
  packed = packed_split(run_data, split)
  if not len(packed):
    raise DataError(f"split {split!r} of {run_data.root!r} has no tokens to evaluate")
  k = run_data.num_clusters
  plan = batch_plan(packed.cluster, batch_size, mode, np.random.default_rng(EVAL_SEED),
                    num_clusters=k)[:max_batches]
  pad = stratified_clusters(batch_size, k) if mode == "stratified" else None
  return _batches(run_data, packed, FixedPlan(plan, packed.cluster, pad), batch_size, shard,
                  num_workers)


def domain_batches(run_data: RunData, domain: str, split: str = "train", *, batch_size: int,
                   seed: int | None = None, max_tokens: int | None = None,
                   repeat: bool | None = None, max_batches: int | None = None,
                   shard: Shard = Shard(), num_workers: int = 0):
  """A specialization domain's split, every sequence tagged with domain_cluster(domain).

  `max_tokens` keeps a fixed (seed-independent, nested: 1M is a prefix of 8M) subset of the split.
  `repeat` (default: split == "train") gives an infinite iterator, each epoch reshuffled with
  (seed, epoch); otherwise one ordered pass of at most `max_batches` batches.
  """
  if not domain:
    raise DataError("domain_batches needs a domain name (config.data.domain); available: "
                    f"{corpus_lib.list_domains(run_data.root)}")
  shard.rows(batch_size)
  packed = packed_split(run_data, split, domain, max_tokens)
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
