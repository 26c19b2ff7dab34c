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
Each process reads rows [p * B/P, (p+1) * B/P) of each global batch, so processes agree on the
step's cluster, their shards are disjoint and together cover the batch. The iterator is a grain
`MapDataset.source(...).to_iter_dataset()` whose state is the next step index: `get_state()` /
`set_state()` resume on exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def train(self) -> Packed:
    if self.train_set is None:
      raise DataError(f"the run data of {self.workdir!r} was loaded without its packed generic "
                      "training set (load_run_data: specialize/eval need only the tokenizer and "
                      "clusters); use prepare_run_data to train on generic data")
    return self.train_set

  def domain_cluster(self, domain: str) -> int:
    """The most frequent cluster of the domain's training windows (ties: lowest id)."""
    key = ("domain_cluster", domain)
    if key not in self._cache:
      wins = windows_of(split_docs(self, "train", domain), self.window)
      ids = self.clusters.assign(self.tokenizer.decode_batch(wins))
      self._cache[key] = int(np.bincount(ids, minlength=self.num_clusters).argmax())
    return self._cache[key]


def _data_settings(config) -> dict:
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
  own RunData) tokenize each domain split once; without config.data.cache_dir, not cached."""
  return _cached_docs(run_data.store, run_data.root, split, domain, run_data.tokenizer)[0]


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


def _build(config, root: str, workdir: str, tok, store, progress: bool, corpus: dict) -> tuple:
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
    assignment = saved.assign(tok.decode_batch(wins))
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
  ready = os.path.join(workdir, "data", "READY.json")
  settings = _data_settings(config)
  if process_index != 0:
    deadline = time.time() + wait_timeout_s
    while True:
      if os.path.exists(ready):
        with open(ready) as f:
          if json.load(f).get("settings") == settings:
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
    model, packed, stats, key = _build(config, root, workdir, tok, store, progress and write,
                                       corpus)
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
  ready = os.path.join(workdir, "data", "READY.json")
  stats = {}
  if os.path.exists(ready):
    with open(ready) as f:
      stats = json.load(f).get("stats", {})
  return RunData(tokenizer=tok, num_clusters=model.k, clusters=model, root=root, workdir=workdir,
                 seq_len=int(config.data.seq_len), window=_window(config), stats=stats,
                 store=_reading_store(config, workdir))


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


# --- iterators -----------------------------------------------------------------------------------

def _local_size(config, process_count: int) -> int:
  b = int(config.data.batch_size)
  if process_count < 1 or b % process_count:
    raise DataError(f"config.data.batch_size={b} is not divisible by process_count="
                    f"{process_count}; use a multiple of the number of hosts")
  return b // process_count


class _EndlessBatches:
  """Random-access source: step -> this process's rows [lo, hi) of an endless stream of global
  batches. Subclasses build per-epoch orders lazily through `_per_epoch`, which keeps each
  stream's latest two epochs (threads of grain's reader share them under a lock)."""

  def __init__(self, packed: Packed, *, batch_size: int, seq_len: int, pad_id: int, seed: int,
               process_index: int, process_count: int):
    self.packed, self.t, self.pad_id, self.seed = packed, seq_len, pad_id, seed
    self.lo = process_index * (batch_size // process_count)
    self.hi = self.lo + batch_size // process_count
    self._lock, self._epochs = threading.Lock(), {}

  def _per_epoch(self, stream, epoch: int, build):
    """build()'s result for (stream, epoch), memoized; the stream's older epochs are dropped."""
    with self._lock:
      if (stream, epoch) not in self._epochs:
        self._epochs = {(s, e): v for (s, e), v in self._epochs.items()
                        if s != stream or e == epoch - 1}
        self._epochs[(stream, epoch)] = build()
      return self._epochs[(stream, epoch)]

  def __getstate__(self):  # picklable for grain's multiprocessing workers
    state = dict(self.__dict__)
    state["_lock"], state["_epochs"] = None, {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return sys.maxsize


class _EpochBatches(_EndlessBatches):
  """step -> this process's local batch (epochs of batch_plan, reshuffled)."""

  def __init__(self, packed: Packed, *, batch_size: int, mode: str, shuffle: bool = True,
               **common):
    super().__init__(packed, batch_size=batch_size, **common)
    self.b, self.mode, self.shuffle = batch_size, mode, shuffle
    self.num_batches = len(batch_plan(packed.cluster, batch_size, mode, None))

  def plan(self, epoch: int) -> np.ndarray:
    def build():
      rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
      return batch_plan(self.packed.cluster, self.b, self.mode, rng)
    return self._per_epoch(None, epoch, build)

  def __getitem__(self, step: int):
    epoch, j = divmod(int(step), self.num_batches)
    rows = self.plan(epoch)[j]
    pad_cluster = int(self.packed.cluster[rows[0]])  # row 0 is real: padding rows come last
    return make_batch(self.packed, rows[self.lo:self.hi], self.t, self.pad_id, pad_cluster)


class _StratifiedBatches(_EndlessBatches):
  """step -> this process's rows of a stratified batch (module doc)."""

  def __init__(self, packed: Packed, *, batch_size: int, num_clusters: int, **common):
    super().__init__(packed, batch_size=batch_size, **common)
    self.b = _rows_per_expert(batch_size, num_clusters)
    self.members = [np.flatnonzero(packed.cluster == c) for c in range(num_clusters)]
    empty = [c for c, m in enumerate(self.members) if not len(m)]
    if empty:
      raise DataError(f"clusters {empty} of the training set hold no sequence, so their "
                      "independent experts could never train: use a larger corpus or a smaller "
                      "config.model.k")

  def order(self, c: int, epoch: int) -> np.ndarray:
    """Cluster c's sequence ids in its epoch `epoch` (the latest two epochs per cluster kept)."""
    def build():
      rng = np.random.default_rng([self.seed, c, epoch])
      return self.members[c][rng.permutation(len(self.members[c]))]
    return self._per_epoch(c, epoch, build)

  def __getitem__(self, step: int):
    rows = []
    for c, members in enumerate(self.members):
      epoch, pos = np.divmod(int(step) * self.b + np.arange(self.b), len(members))
      rows.append([self.order(c, int(e))[p] for e, p in zip(epoch, pos)])
    rows = np.concatenate(rows).astype(np.int64)
    return make_batch(self.packed, rows[self.lo:self.hi], self.t, self.pad_id)


def _to_iterator(source, config, finite_len: int | None = None):
  import grain
  ds = grain.MapDataset.source(source)
  if finite_len is not None:
    ds = ds[:finite_len]
  workers = int(config.data.get("num_workers", 0) or 0)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds)


def _check_enough(packed: Packed, config, what: str):
  b = int(config.data.batch_size)
  if len(packed) < b:
    raise DataError(f"{what} holds {packed.num_targets:,} target tokens = {len(packed)} sequences "
                    f"of seq_len={config.data.seq_len}, fewer than one global batch of "
                    f"{b}: lower config.data.batch_size / seq_len or use a larger corpus")


def train_iterator(config, run_data: RunData, *, process_index: int = 0, process_count: int = 1):
  """Infinite grain DatasetIterator of local batches {inputs, targets, mask, cluster}."""
  _local_size(config, process_count)
  _check_enough(run_data.train, config, f"the training set of corpus {run_data.root!r}")
  common = dict(batch_size=int(config.data.batch_size), seq_len=run_data.seq_len,
                pad_id=run_data.tokenizer.pad_id, seed=int(config.seed),
                process_index=process_index, process_count=process_count)
  if config.data.cluster_batching == "stratified":
    source = _StratifiedBatches(run_data.train, num_clusters=run_data.num_clusters, **common)
  else:
    source = _EpochBatches(run_data.train, mode=config.data.cluster_batching, **common)
  return _to_iterator(source, config)


def domain_docs(run_data: RunData, domain: str, split: str,
                max_tokens: int | None = None) -> list[np.ndarray]:
  """A domain split's tokenized documents in a fixed (seed-independent) order, cut after
  `max_tokens` tokens: the 1M subset is a prefix of the 8M one. Shared by the domain iterators
  and the specialization stage's cluster assignment, so both see the same documents."""
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


def packed_split(run_data: RunData, split: str, domain: str = "",
                  max_tokens: int | None = None) -> Packed:
  """Held-out generic text (packed per assigned cluster) or a domain split (one stream)."""
  key = ("split", split, domain, max_tokens)
  if key in run_data._cache:
    return run_data._cache[key]
  tok = run_data.tokenizer
  if domain:
    docs = domain_docs(run_data, domain, split, max_tokens)
    packed = pack_stream(docs, run_data.seq_len, tok.bos_id, run_data.domain_cluster(domain))
  else:
    wins = windows_of(split_docs(run_data, split), run_data.window)
    ids = run_data.clusters.assign(tok.decode_batch(wins))
    packed = pack(wins, ids, run_data.seq_len, tok.bos_id, run_data.num_clusters)
  run_data._cache[key] = packed
  return packed


class _FixedBatches:
  """A finite plan's batches; padding rows get `pad_clusters` (stratified: the slot's cluster)
  or else the batch's first row's cluster."""

  def __init__(self, packed: Packed, plan: np.ndarray, seq_len: int, pad_id: int,
               lo: int, hi: int, pad_clusters: np.ndarray | None = None):
    self.packed, self.plan, self.t, self.pad_id = packed, plan, seq_len, pad_id
    self.lo, self.hi, self.pad_clusters = lo, hi, pad_clusters

  def __len__(self):
    return len(self.plan)

  def __getitem__(self, j):
    rows = self.plan[j]
    if self.pad_clusters is not None:
      pad = self.pad_clusters[self.lo:self.hi]
    else:
      pad = int(self.packed.cluster[rows[0]])
    return make_batch(self.packed, rows[self.lo:self.hi], self.t, self.pad_id, pad)


def eval_iterator(config, run_data: RunData, *, split: str = "validation", process_index: int = 0,
                  process_count: int = 1):
  """Finite: at most config.data.eval_batches batches of held-out generic (or domain) text."""
  domain = config.data.get("domain", "") or ""
  return domain_iterator(config, run_data, domain, split, process_index=process_index,
                         process_count=process_count, repeat=False,
                         max_batches=int(config.data.eval_batches)) if domain else \
      _eval_generic(config, run_data, split, process_index, process_count)


def _eval_generic(config, run_data, split, process_index, process_count):
  local = _local_size(config, process_count)
  packed = packed_split(run_data, split)
  if not len(packed):
    raise DataError(f"split {split!r} of {run_data.root!r} has no tokens to evaluate")
  mode, b, k = config.data.cluster_batching, int(config.data.batch_size), run_data.num_clusters
  plan = batch_plan(packed.cluster, b, mode, np.random.default_rng(EVAL_SEED),
                    num_clusters=k)[:int(config.data.eval_batches)]
  pad = stratified_clusters(b, k) if mode == "stratified" else None
  lo = process_index * local
  return _to_iterator(_FixedBatches(packed, plan, run_data.seq_len, run_data.tokenizer.pad_id,
                                    lo, lo + local, pad), config)


def domain_iterator(config, run_data: RunData, domain: str, split: str = "train",
                    max_tokens: int | None = None, *, repeat: bool | None = None,
                    max_batches: int | None = None, batch_size: int | None = None,
                    process_index: int = 0, process_count: int = 1):
  """A specialization domain's split, every sequence tagged with the domain's majority cluster.

  `max_tokens` keeps a fixed (seed-independent, nested: 1M is a prefix of 8M) subset of the split.
  `repeat` (default: split == "train") gives an infinite, per-epoch reshuffled iterator seeded by
  config.seed; otherwise one ordered pass (at most `max_batches` batches).
  """
  if not domain:
    raise DataError("domain_iterator needs a domain name (config.data.domain); available: "
                    f"{corpus_lib.list_domains(run_data.root)}")
  if batch_size is not None:
    config = config.copy_and_resolve_references()
    config.data.batch_size = batch_size
  local = _local_size(config, process_count)
  packed = packed_split(run_data, split, domain, max_tokens)
  if not len(packed):
    raise DataError(f"domain {domain!r} split {split!r} has no tokens (max_tokens={max_tokens})")
  repeat = split == "train" if repeat is None else repeat
  b = int(config.data.batch_size)
  if repeat:
    _check_enough(packed, config, f"domain {domain!r} split {split!r}")
    source = _EpochBatches(packed, batch_size=b, seq_len=run_data.seq_len,
                           pad_id=run_data.tokenizer.pad_id, mode="mixed", seed=int(config.seed),
                           process_index=process_index, process_count=process_count)
    return _to_iterator(source, config)
  plan = batch_plan(packed.cluster, b, "mixed", None)
  if max_batches is not None:
    plan = plan[:max_batches]
  lo = process_index * local
  return _to_iterator(_FixedBatches(packed, plan, run_data.seq_len, run_data.tokenizer.pad_id,
                                    lo, lo + local), config)
