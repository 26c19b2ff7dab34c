"""Run data: tokenizer + clusters + packed sequences (batches.py batches them).

Packing (done once per run, cached under `<workdir>/data/`; the arrays are packing.py's):
  1. every generic training document is tokenized and followed by eos;
  2. its tokens are cut into non-overlapping windows of `cluster_window` tokens (default seq_len;
     the paper uses 1,024), each window is embedded and assigned to its k-means cluster;
  3. per cluster c, the windows are concatenated in corpus order behind one bos, giving a stream
     S_c; sequence j of cluster c is S_c[jT : jT + T + 1] (inputs = [:-1], targets = [1:]), so
     every token of S_c after the bos is a target exactly once, and each sequence has one cluster.
prepare_run_data builds (process 0) or waits for and loads (other processes) that data; its
READY.json, written last, marks a prepared workdir (is_prepared, prepared_with, copy_prepared).
load_run_data reads a prepared run's tokenizer and clusters only. Held-out and domain splits are
packed on demand (packed_split), memoized per RunData.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from pn_jax import storage
from pn_jax.data.errors import DataError
from pn_jax.data import cache as cache_lib
from pn_jax.data import clusters as clusters_lib
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import packing
from pn_jax.data import provenance
from pn_jax.data import tokenizer as tok_lib
from pn_jax.data.packing import Packed

FORMAT_VERSION = 2
EVAL_SEED = 1234  # eval/domain subsets do not depend on the run seed: comparable across runs


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
          "cluster_dim": int(d.get("cluster_dim", 64)),
          **({"balanced": True} if _balanced(config) else {})}  # (absent: as before the key)


def _balanced(config) -> bool:
  return bool(config.data.get("cluster_balance", False))  # .get: configs saved before the key


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
  with storage.writing(path, temp=tmp):  # a record that cannot be written: no tokenizer either
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
  docs = packing.tokenize_docs(tok, corpus_lib.load_texts(root, split, domain))
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
  """-> (centroids, every window's cluster, stage key): k-means on the fit rows (balanced:
  balanced k-means, and every window placed so the clusters' sizes are within one)."""
  k, seed, balanced = int(config.model.k), int(config.seed), _balanced(config)
  clusters_lib.check_k(k, len(rows))
  key = cache_lib.key("clusters", embed_key, k, seed, *(("balanced",) if balanced else ()))
  hit = store.load("clusters", key, ("centroids", "assignment"))
  if hit is not None:
    return hit["centroids"], hit["assignment"], key
  if balanced:
    centroids = clusters_lib.fit_balanced_centroids(x[rows], k, seed)
    assignment = clusters_lib.balanced_assign(x, centroids)
  else:
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
  got["balanced"] = bool(saved.meta.get("balanced", False))  # (runs before the key: not)
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
                                "window": window, "tokenizer": tok.fingerprint(), "seed": seed,
                                "balanced": _balanced(config)}, corpus)
  t0 = time.time()
  docs, docs_key = _cached_docs(store, root, "train", "", tok)
  wins = packing.windows_of(docs, window)
  emb, x, rows, embed_key = _embed_windows(config, store, wins, docs_key, tok, progress)
  centroids, assignment, routing_key = _fit_routing(config, store, x, rows, embed_key)
  fitted = clusters_lib.with_centroids(emb, centroids, embedding=emb.embedding, window=window,
                                       tokenizer=tok.fingerprint(), seed=seed, corpus=corpus,
                                       **({"balanced": True} if _balanced(config) else {}))
  model = fitted if saved is None else saved
  if saved is not None and not _same_model(saved, fitted):
    # fitted by an earlier build (other code): the run keeps its routing, the cache is bypassed
    assignment = (clusters_lib.balanced_assign(saved.embed(tok.decode_batch(wins)),
                                               saved.centroids)
                  if _balanced(config) else window_clusters(saved, tok, wins))
    routing_key = cache_lib.key("workdir-clusters", hashlib.sha256(assignment).hexdigest())
  key = cache_lib.key("packed", routing_key, int(config.data.seq_len), tok.bos_id)
  hit = _load_packed(store, key)
  if hit is not None:
    packed, stats = hit
  else:
    packed = packing.pack(wins, assignment, int(config.data.seq_len), tok.bos_id, k)
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


def prepared_train_set(run_data: RunData) -> Packed:
  """The packed generic training set that `run_data`'s (pretraining) run was prepared with,
  read from its store and never built: what a stage that reads a finished run's generic text
  needs (prune's calibration batches). DataError if it is not there."""
  ready = _ready_file(run_data.workdir)
  try:
    with open(ready) as f:
      key = json.load(f)["packed"]
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"{ready} does not name a prepared training set ({type(e).__name__}: {e}): "
                    f"{run_data.workdir} is not a finished pretraining run's workdir") from e
  hit = _load_packed(run_data.store, key)
  if hit is None:
    raise DataError(f"the packed training set {key} of {run_data.workdir} is not in "
                    f"{run_data.store.directory} (moved or deleted cache?): rerun that "
                    "pretraining's data preparation, or point data.cache_dir at its cache")
  return hit[0]


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
      return split_cluster_shares(run_data, domain, "train")
    wins = packing.windows_of(domain_docs(run_data, domain, "train", max_tokens), run_data.window)
    return _cluster_shares(run_data, wins, weights=[len(w) for w in wins])

  key = ("domain_histogram", domain, rule, None if rule == "split" else max_tokens)
  return run_data.memo.get(key, build)


def split_cluster_shares(run_data: RunData, domain: str, split: str) -> np.ndarray:
  """float64 [k]: each cluster's share of a domain split's clustering windows (file order; every
  window counts once): domain_histogram's 'split' rule for the train split, and the data report's
  per-split table (does a domain's test split fall where its training split does?)."""
  wins = packing.windows_of(split_docs(run_data, split, domain), run_data.window)
  return _cluster_shares(run_data, wins)


def _cluster_shares(run_data: RunData, windows, weights=None) -> np.ndarray:
  ids = window_clusters(run_data.clusters, run_data.tokenizer, windows)
  counts = np.bincount(ids, weights=weights, minlength=run_data.num_clusters)
  return counts / max(counts.sum(), 1.0)


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
      return packing.pack_stream(docs, run_data.seq_len, tok.bos_id,
                                 domain_cluster(run_data, domain))
    wins = packing.windows_of(split_docs(run_data, split), run_data.window)
    ids = window_clusters(run_data.clusters, tok, wins)
    return packing.pack(wins, ids, run_data.seq_len, tok.bos_id, run_data.num_clusters)
  return run_data.memo.get(("split", split, domain, max_tokens), build)

