"""The shared data-preparation cache (data.cache_dir): reuse across runs, equality with an
uncached build, unreadable files rebuilt, and modes that never load the packed training set."""

import collections
import os

import numpy as np
import pytest

from conftest import eval_batches
from pn_jax.config import base_config
from pn_jax.data import DataError
from pn_jax.data import cache as cache_lib
from pn_jax.data import clusters as clusters_lib
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import batches
from pn_jax.data import packing
from pn_jax.data import pipeline
from pn_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  """One tokenizer shared by every run, as in an experiment."""
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  tok_lib.train_tokenizer(corpus_lib.load_texts(corpus_lib.TINY_ROOT, "train"), path, 512, 0,
                          max_chars=300_000)
  return path


def config_for(tokenizer_path, cache_dir="", k=4):
  c = base_config()
  c.model.vocab_size, c.model.k = 512, k
  c.data.update(corpus="tiny", tokenizer_path=tokenizer_path, seq_len=64, batch_size=8,
                eval_batches=2, cluster_window=256, cache_dir=cache_dir, prep_workers=1)
  return c


@pytest.fixture
def calls(monkeypatch):
  """Counts the expensive steps of data preparation."""
  n = collections.Counter()

  def counted(module, name):
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
      n[name] += 1
      return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)

  counted(packing, "tokenize_docs")
  counted(clusters_lib, "fit_embedding")
  counted(clusters_lib, "fit_centroids")
  return n


def assert_same(a, b):
  for f in ("tokens", "starts", "ends", "cluster"):
    np.testing.assert_array_equal(getattr(a.train, f), getattr(b.train, f))
  np.testing.assert_array_equal(a.clusters.centroids, b.clusters.centroids)


def stages(cache_dir):
  return sorted(name.split("-")[0] for name in os.listdir(cache_dir) if name.endswith(".npz"))


def test_runs_share_the_cache(tmp_path, tokenizer_path, calls):
  cache = str(tmp_path / "cache")
  a = pipeline.prepare_run_data(config_for(tokenizer_path, cache), str(tmp_path / "a"),
                                progress=False)
  assert calls == {"tokenize_docs": 1, "fit_embedding": 1, "fit_centroids": 1}
  assert stages(cache) == ["clusters", "docs", "embed", "packed"]
  # same k, another workdir: nothing recomputed, the run still gets its own clusters/ and READY
  b = pipeline.prepare_run_data(config_for(tokenizer_path, cache), str(tmp_path / "b"),
                                progress=False)
  assert calls == {"tokenize_docs": 1, "fit_embedding": 1, "fit_centroids": 1}
  assert_same(a, b)
  for f in ("clusters/meta.json", "clusters/model.npz", "data/READY.json"):
    assert os.path.exists(tmp_path / "b" / f), f
  np.testing.assert_array_equal(clusters_lib.load_clusters(str(tmp_path / "b" / "clusters"))
                                .centroids, a.clusters.centroids)
  follower = pipeline.prepare_run_data(config_for(tokenizer_path, cache), str(tmp_path / "b"),
                                       process_index=1, wait_timeout_s=5, progress=False)
  assert_same(a, follower)
  # another k: tokens and embeddings reused, only k-means and packing run
  c = pipeline.prepare_run_data(config_for(tokenizer_path, cache, k=3), str(tmp_path / "c"),
                                progress=False)
  assert calls == {"tokenize_docs": 1, "fit_embedding": 1, "fit_centroids": 2}
  assert c.clusters.k == 3 and set(np.unique(c.train.cluster)) <= {0, 1, 2}
  assert stages(cache) == ["clusters", "clusters", "docs", "embed", "packed", "packed"]
  # an uncached build gives the same arrays
  for k, cached in ((4, a), (3, c)):
    plain = pipeline.prepare_run_data(config_for(tokenizer_path, k=k), str(tmp_path / f"u{k}"),
                                      progress=False)
    assert_same(cached, plain)
    assert plain.stats["cluster_windows"] == cached.stats["cluster_windows"]
  assert not os.path.exists(tmp_path / "u4" / "data" / "docs")  # no cache_dir: packed set only
  assert stages(str(tmp_path / "u4" / "data")) == ["packed"]


def _damage(path, how):
  data = open(path, "rb").read()
  if how == "truncate":
    data = data[:len(data) // 2]
  else:  # flip bytes in the middle of the array data: the zip CRC no longer matches
    mid = len(data) // 2
    data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
  open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_cache_files_are_rebuilt(tmp_path, tokenizer_path, calls, how, capsys):
  cache = str(tmp_path / "cache")
  a = pipeline.prepare_run_data(config_for(tokenizer_path, cache), str(tmp_path / "a"),
                                progress=False)
  files = {name.split("-")[0]: os.path.join(cache, name) for name in os.listdir(cache)}
  for stage in ("embed", "packed"):
    _damage(files[stage], how)
  open(os.path.join(cache, ".packed-x.tmp.npz"), "wb").write(b"half a file")  # a killed write
  b = pipeline.prepare_run_data(config_for(tokenizer_path, cache), str(tmp_path / "b"),
                                progress=False)
  assert calls["fit_embedding"] == 2  # the damaged embeddings were recomputed, not trusted
  assert_same(a, b)
  err = capsys.readouterr().err
  assert files["embed"] in err and files["packed"] in err and "rebuilding" in err
  c = pipeline.prepare_run_data(config_for(tokenizer_path, cache), str(tmp_path / "c"),
                                progress=False)
  assert calls["fit_embedding"] == 2  # the rebuilt files are good
  assert_same(a, c)


def test_store_atomic_and_checked(tmp_path):
  store = cache_lib.ArtefactStore(str(tmp_path))
  store.save("docs", "k1", {"tokens": np.arange(5, dtype=np.int32)})
  assert os.listdir(tmp_path) == ["docs-k1.npz"]  # no temporary file left behind
  assert store.load("docs", "k1", ("tokens", "doc_lens")) is None  # a missing array: not trusted
  assert not os.listdir(tmp_path)
  with pytest.raises(ValueError, match="unknown artefact stages"):
    cache_lib.ArtefactStore(str(tmp_path), keep=("bogus",))
  readonly = cache_lib.ArtefactStore(str(tmp_path), write=False)
  readonly.save("docs", "k2", {"tokens": np.arange(3)})
  assert not os.listdir(tmp_path)


def test_embed_many_in_processes_matches_serial():
  texts = corpus_lib.load_texts(corpus_lib.TINY_ROOT, "validation")[:60]
  model = clusters_lib.fit_clusters(texts, 2, seed=0)
  np.testing.assert_array_equal(clusters_lib.embed_many(model, texts, workers=2, chunk=16),
                                model.embed(texts))


def test_later_stages_do_not_load_the_training_set(tmp_path, tokenizer_path, calls, monkeypatch):
  cache = str(tmp_path / "cache")
  config = config_for(tokenizer_path, cache)
  pipeline.prepare_run_data(config, str(tmp_path / "pre"), progress=False)

  def forbidden(*args, **kwargs):
    raise AssertionError("the packed generic training set was loaded or built")
  for name in ("build_training_set", "prepare_run_data"):
    monkeypatch.setattr(pipeline, name, forbidden)
  monkeypatch.setattr(cache_lib.ArtefactStore, "load", lambda self, stage, *a: (
      forbidden() if stage == "packed" else STORE_LOAD(self, stage, *a)))

  rd = pipeline.load_run_data(config, str(tmp_path / "pre"))
  with pytest.raises(DataError, match="without its packed generic training set"):
    rd.train
  domain = corpus_lib.list_domains(rd.root)[0]
  before = calls["tokenize_docs"]
  hist = pipeline.domain_histogram(rd, domain, rule="budget", max_tokens=2000)
  assert hist.shape == (4,) and hist.sum() == pytest.approx(1.0)
  assert len(list(batches.domain_batches(rd, domain, "train", batch_size=config.data.batch_size,
                                         max_tokens=2000, repeat=False))) >= 1
  assert len(list(eval_batches(config, rd))) >= 1  # generic validation
  tokenized = calls["tokenize_docs"] - before
  # a second cell (a new RunData, as each specialize call makes) re-tokenizes no split
  rd2 = pipeline.load_run_data(config, str(tmp_path / "pre"))
  pipeline.domain_histogram(rd2, domain, rule="budget", max_tokens=2000)
  list(batches.domain_batches(rd2, domain, "train", batch_size=config.data.batch_size,
                              max_tokens=2000, repeat=False))
  list(eval_batches(config, rd2))
  assert calls["tokenize_docs"] - before == tokenized
  assert pipeline.domain_cluster(rd2, domain) == pipeline.domain_cluster(rd, domain)


STORE_LOAD = cache_lib.ArtefactStore.load


def test_workdir_clusters_of_an_earlier_build_are_kept(tmp_path, tokenizer_path):
  """A resumed run keeps the routing its model was trained with, even if today's fit differs."""
  cache, workdir = str(tmp_path / "cache"), str(tmp_path / "a")
  a = pipeline.prepare_run_data(config_for(tokenizer_path, cache), workdir, progress=False)
  cdir = os.path.join(workdir, "clusters")
  old = clusters_lib.load_clusters(cdir)
  old.centroids = old.centroids[::-1].copy()  # the same clusters under other ids
  old.save(cdir)
  os.remove(os.path.join(workdir, "data", "READY.json"))  # an earlier build's workdir
  b = pipeline.prepare_run_data(config_for(tokenizer_path, cache), workdir, progress=False)
  np.testing.assert_array_equal(b.clusters.centroids, old.centroids)
  np.testing.assert_array_equal(np.bincount(b.train.cluster, minlength=4),
                                np.bincount(a.train.cluster, minlength=4)[::-1])


def test_rerun_and_follower_reuse_the_workdir(tmp_path, tokenizer_path, calls):
  """Without cache_dir, a resumed run and a follower process read READY.json's packed set: no
  tokenizing, embedding or k-means again."""
  config, workdir = config_for(tokenizer_path), str(tmp_path / "w")
  a = pipeline.prepare_run_data(config, workdir, progress=False)
  done = dict(calls)
  again = pipeline.prepare_run_data(config, workdir, progress=False)
  follower = pipeline.prepare_run_data(config, workdir, process_index=1, wait_timeout_s=5,
                                       progress=False)
  assert calls == done
  assert_same(a, again)
  assert_same(a, follower)
