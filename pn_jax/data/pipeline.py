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
import threading
import time

import numpy as np

from pn_jax.data import DataError
from pn_jax.data import clusters as clusters_lib
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import tokenizer as tok_lib

FORMAT_VERSION = 1
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

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=self.tokens, starts=self.starts, ends=self.ends, cluster=self.cluster)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Packed":
    with np.load(path, allow_pickle=False) as z:
      return cls(z["tokens"], z["starts"], z["ends"], z["cluster"])


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
  tokenizer: tok_lib.Tokenizer
  num_clusters: int
  clusters: clusters_lib.ClusterModel
  train: Packed
  root: str  # prepared corpus root
  workdir: str
  seq_len: int
  window: int
  stats: dict  # documents / windows / tokens / cluster sizes of the training set
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def domain_cluster(self, domain: str) -> int:
    """The most frequent cluster of the domain's training windows (ties: lowest id)."""
    key = ("domain_cluster", domain)
    if key not in self._cache:
      docs = tokenize_docs(self.tokenizer, corpus_lib.load_texts(self.root, "train", domain))
      wins = windows_of(docs, self.window)
      ids = self.clusters.assign([self.tokenizer.decode(w) for w in wins])
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


def _file_id(path: str) -> str:
  st = os.stat(path)
  return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _key(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _load_or_train_tokenizer(config, root: str, workdir: str, write: bool) -> tok_lib.Tokenizer:
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
    if os.path.exists(path) or not write:
      tok = tok_lib.load_tokenizer(path)
    else:
      texts = corpus_lib.load_texts(root, "train")
      order = np.random.default_rng(config.seed).permutation(len(texts))
      tok = tok_lib.train_tokenizer((texts[i] for i in order), path,
                                    int(config.model.vocab_size), int(config.seed),
                                    max_chars=int(d.get("tokenizer_sample_chars", 20_000_000)))
  if tok.vocab_size > config.model.vocab_size:
    raise DataError(f"tokenizer {tok.path!r} has {tok.vocab_size} ids but config.model.vocab_size"
                    f"={config.model.vocab_size}; raise vocab_size (>= {tok.vocab_size})")
  return tok


def _build(config, root: str, workdir: str, tok, progress: bool, write: bool = True) -> tuple:
  """Tokenize, window, cluster, pack the generic training set; only `write` saves files."""
  d, k = config.data, int(config.model.k)
  settings = _data_settings(config)
  train_path = corpus_lib.existing_split_file(corpus_lib.split_path(root, "train"))
  texts = corpus_lib.load_texts(root, "train")  # validates the file before _file_id
  key = _key([settings, _file_id(train_path), tok.fingerprint()])
  data_dir = os.path.join(workdir, "data")
  packed_path = os.path.join(data_dir, f"train-{key}.npz")
  stats_path = os.path.join(data_dir, f"train-{key}.json")
  cdir = os.path.join(workdir, "clusters")
  if os.path.exists(packed_path) and os.path.exists(stats_path):
    with open(stats_path) as f:
      return clusters_lib.load_clusters(cdir), Packed.load(packed_path), json.load(f)
  t0 = time.time()
  docs = tokenize_docs(tok, texts)
  window = _window(config)
  wins = windows_of(docs, window)
  win_texts = [tok.decode(w) for w in wins]
  expect = {"k": k, "embedding": d.cluster_embedding, "window": window,
            "tokenizer": tok.fingerprint(), "seed": int(config.seed)}
  if os.path.exists(os.path.join(cdir, "meta.json")):
    model = clusters_lib.load_clusters(cdir)
    got = {key_: model.meta.get(key_) for key_ in expect}
    got["k"], got["embedding"] = model.k, model.embedding
    if got != expect:
      raise DataError(f"{cdir} holds clusters for {got} but the config asks for {expect}; use a "
                      "fresh --workdir (clusters define the routing of a trained model)")
  else:
    model = clusters_lib.fit_clusters(win_texts, k, int(config.seed),
                                      embedding=d.cluster_embedding,
                                      dim=int(d.get("cluster_dim", 64)))
    model.meta.update(expect)
  if model.fit_texts is not None and len(model.fit_texts) == len(win_texts):
    assignment = model.fit_assignment  # fitted on every window: no second embedding pass
  else:
    assignment = model.assign(win_texts)
  packed = pack(wins, assignment, int(d.seq_len), tok.bos_id, k)
  sizes = clusters_lib.cluster_sizes(assignment, k)
  win_tokens = np.bincount(assignment, weights=[len(w) for w in wins], minlength=k)
  stats = {"documents": len(docs), "windows": len(wins), "tokens": int(sum(map(len, docs))),
           "sequences": len(packed), "cluster_windows": sizes,
           "cluster_tokens": win_tokens.astype(int).tolist(),
           "cluster_sequences": clusters_lib.cluster_sizes(packed.cluster, k),
           "build_seconds": round(time.time() - t0, 2)}
  model.meta["train_stats"] = stats
  if not write:  # a follower process that cannot see process 0's files: same result, in memory
    return model, packed, stats
  if not os.path.exists(os.path.join(cdir, "meta.json")):
    model.save(cdir)
  os.makedirs(data_dir, exist_ok=True)
  packed.save(packed_path)
  corpus_lib.write_json(stats_path, stats)
  if progress:
    print(f"pn_jax.data: packed {stats['tokens']:,} tokens of {root} into {len(packed):,} "
          f"sequences in {k} clusters ({stats['build_seconds']} s)", file=sys.stderr)
  return model, packed, stats


def prepare_run_data(config, workdir: str, *, process_index: int = 0,
                     wait_timeout_s: float = 3600.0, progress: bool = True) -> RunData:
  """Tokenizer + clusters + packed training sequences for this run (idempotent, cached).

  Process 0 builds and writes everything under `workdir`; other processes wait for its READY
  marker (written last) and then load the same files.
  """
  root = corpus_lib.resolve_root(config.data.corpus, config.data.data_dir)
  if not os.path.isdir(root):
    raise DataError(f"corpus {config.data.corpus!r} resolves to {root!r}, which does not exist: "
                    "run `python -m pn_jax.data prepare --out=<data_dir>` and set "
                    "config.data.data_dir, or use config.data.corpus='tiny'")
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
  tok = _load_or_train_tokenizer(config, root, workdir, write=process_index == 0)
  model, packed, stats = _build(config, root, workdir, tok, progress and process_index == 0,
                                write=process_index == 0)
  if process_index == 0:
    corpus_lib.write_json(ready, {"settings": settings, "stats": stats})
  return RunData(tokenizer=tok, num_clusters=int(config.model.k), clusters=model, train=packed,
                 root=root, workdir=workdir, seq_len=int(config.data.seq_len),
                 window=_window(config), stats=stats)


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


class _EpochBatches:
  """Random-access source: step -> this process's local batch (infinite, epochs reshuffled)."""

  def __init__(self, packed: Packed, *, batch_size: int, seq_len: int, pad_id: int, mode: str,
               seed: int, process_index: int, process_count: int, shuffle: bool = True):
    self.packed, self.b, self.t, self.pad_id = packed, batch_size, seq_len, pad_id
    self.mode, self.seed, self.shuffle = mode, seed, shuffle
    self.lo = process_index * (batch_size // process_count)
    self.hi = self.lo + batch_size // process_count
    self.num_batches = len(batch_plan(packed.cluster, batch_size, mode, None))
    self._lock, self._plans = threading.Lock(), {}

  def plan(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._plans:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        self._plans = {epoch: batch_plan(self.packed.cluster, self.b, self.mode, rng),
                       **{e: p for e, p in self._plans.items() if e == epoch - 1}}
      return self._plans[epoch]

  def __getstate__(self):  # picklable for grain's multiprocessing workers
    state = dict(self.__dict__)
    state["_lock"], state["_plans"] = None, {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, step: int):
    epoch, j = divmod(int(step), self.num_batches)
    rows = self.plan(epoch)[j]
    pad_cluster = int(self.packed.cluster[rows[0]])  # row 0 is real: padding rows come last
    return make_batch(self.packed, rows[self.lo:self.hi], self.t, self.pad_id, pad_cluster)


class _StratifiedBatches:
  """Random-access source: step -> this process's rows of a stratified batch (module doc)."""

  def __init__(self, packed: Packed, *, batch_size: int, num_clusters: int, seq_len: int,
               pad_id: int, seed: int, process_index: int, process_count: int):
    self.packed, self.t, self.pad_id, self.seed = packed, seq_len, pad_id, seed
    self.b = _rows_per_expert(batch_size, num_clusters)
    self.members = [np.flatnonzero(packed.cluster == c) for c in range(num_clusters)]
    empty = [c for c, m in enumerate(self.members) if not len(m)]
    if empty:
      raise DataError(f"clusters {empty} of the training set hold no sequence, so their "
                      "independent experts could never train: use a larger corpus or a smaller "
                      "config.model.k")
    self.lo = process_index * (batch_size // process_count)
    self.hi = self.lo + batch_size // process_count
    self._lock, self._orders = threading.Lock(), {}

  def order(self, c: int, epoch: int) -> np.ndarray:
    """Cluster c's sequence ids in its epoch `epoch` (the latest two epochs per cluster kept)."""
    with self._lock:
      if (c, epoch) not in self._orders:
        rng = np.random.default_rng([self.seed, c, epoch])
        self._orders = {key: o for key, o in self._orders.items()
                        if key[0] != c or key[1] == epoch - 1}
        self._orders[(c, epoch)] = self.members[c][rng.permutation(len(self.members[c]))]
      return self._orders[(c, epoch)]

  def __getstate__(self):  # picklable for grain's multiprocessing workers
    state = dict(self.__dict__)
    state["_lock"], state["_orders"] = None, {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return sys.maxsize

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
  texts = corpus_lib.load_texts(run_data.root, split, domain)
  order = np.random.default_rng(EVAL_SEED).permutation(len(texts))
  docs = tokenize_docs(run_data.tokenizer, [texts[i] for i in order])
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
    docs = tokenize_docs(tok, corpus_lib.load_texts(run_data.root, split))
    wins = windows_of(docs, run_data.window)
    ids = run_data.clusters.assign([tok.decode(w) for w in wins])
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
