"""Packing, batching, determinism, resume and per-process sharding on the bundled tiny corpus."""

import collections

import numpy as np
import pytest

from conftest import eval_batches, train_batches
from pn_jax.config import base_config
from pn_jax.data import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import batches
from pn_jax.data import packing
from pn_jax.data import pipeline


def tiny_config(**data):
  c = base_config()
  c.model.vocab_size = 512
  c.model.k = 4
  c.data.corpus = "tiny"
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.data.eval_batches = 3
  c.data.cluster_window = 256  # fewer, longer windows to cluster: a faster fixture
  for key, value in data.items():
    c.data[key] = value
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("run"))
  return config, pipeline.prepare_run_data(config, workdir, progress=False), workdir


def take(it, n):
  return [next(it) for _ in range(n)]


def epoch_len(config, run_data):
  return len(batches.batch_plan(run_data.train.cluster, config.data.batch_size,
                                config.data.cluster_batching, None))


def all_doc_tokens(run_data):
  texts = corpus_lib.load_texts(run_data.root, "train")
  docs = packing.tokenize_docs(run_data.tokenizer, texts)
  return collections.Counter(np.concatenate(docs).tolist())


def test_batch_format(run):
  config, rd, _ = run
  b = next(train_batches(config, rd))
  assert set(b) == {"inputs", "targets", "mask", "cluster"}
  assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (8, 64)
  assert b["inputs"].dtype == b["targets"].dtype == b["cluster"].dtype == np.int32
  assert b["mask"].dtype == np.float32 and b["cluster"].shape == (8,)
  m = b["mask"][:, 1:] * b["mask"][:, :-1]
  assert np.array_equal(b["targets"][:, :-1] * m, b["inputs"][:, 1:] * m)  # next-token targets
  assert (b["inputs"] < rd.tokenizer.vocab_size).all() and (b["cluster"] < 4).all()


@pytest.mark.parametrize("mode", ["homogeneous", "mixed"])
def test_epoch_has_every_token_once(run, mode):
  config, rd, _ = run
  config = tiny_config(cluster_batching=mode)
  n = epoch_len(config, rd)
  seen = collections.Counter()
  for b in take(train_batches(config, rd), n):
    seen.update(b["targets"][b["mask"] > 0].tolist())
    if mode == "homogeneous":
      assert len(set(b["cluster"].tolist())) == 1  # one cluster per global batch
  assert seen == all_doc_tokens(rd)  # no token lost or duplicated across the epoch
  assert sum(seen.values()) == rd.stats["tokens"] == rd.train.num_targets


def test_sequence_cluster_matches_assignment(run):
  """Each cluster's sequences are exactly bos + the windows k-means assigned to that cluster."""
  _, rd, _ = run
  tok, p = rd.tokenizer, rd.train
  docs = packing.tokenize_docs(tok, corpus_lib.load_texts(rd.root, "train"))
  wins = packing.windows_of(docs, rd.window)
  assert rd.window == 256 and max(len(w) for w in wins) == 256
  ids = pipeline.assign_clusters(rd, [tok.decode(w) for w in wins])
  for c in range(rd.num_clusters):
    seqs = np.flatnonzero(p.cluster == c)
    assert len(seqs) and (np.diff(p.starts[seqs]) == rd.seq_len).all()
    stream = p.tokens[p.starts[seqs[0]]:p.ends[seqs[-1]]]
    expected = np.concatenate([[tok.bos_id]] + [w for w, i in zip(wins, ids) if i == c])
    np.testing.assert_array_equal(stream, expected)


def test_batches_mix_clusters_by_default():
  assert base_config().data.cluster_batching == "mixed"  # the paper's objective (docs/data.md)


def test_homogeneous_visits_clusters_by_size(run):
  config, rd, _ = run
  config = tiny_config(cluster_batching="homogeneous")
  n = epoch_len(config, rd)
  counts = collections.Counter(int(b["cluster"][0]) for b in take(
      train_batches(config, rd), n))
  sizes = np.bincount(rd.train.cluster, minlength=4)
  expected = {c: -(-int(sizes[c]) // 8) for c in range(4) if sizes[c]}
  assert dict(counts) == expected


def test_deterministic_and_reshuffled_per_epoch(run):
  config, rd, _ = run
  n = epoch_len(config, rd)
  a = take(train_batches(config, rd), n + 3)
  b = take(train_batches(config, rd), n + 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not all(np.array_equal(a[i]["inputs"], a[n + i]["inputs"]) for i in range(3))
  other = take(train_batches(tiny_config(), rd, process_index=0, process_count=1), 1)
  np.testing.assert_array_equal(other[0]["inputs"], a[0]["inputs"])
  config2 = tiny_config()
  config2.seed = 7
  c = take(train_batches(config2, rd), 3)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_resume_gives_same_batches(run):
  config, rd, _ = run
  it = train_batches(config, rd)
  take(it, 5)
  state = it.get_state()
  expected = take(it, 6)
  fresh = train_batches(config, rd)
  fresh.set_state(state)
  for x, y in zip(expected, take(fresh, 6)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("mode", ["homogeneous", "mixed"])
def test_process_shards_disjoint_and_covering(run, mode):
  config, rd, _ = run
  config = tiny_config(cluster_batching=mode)
  n = epoch_len(config, rd)
  whole = take(train_batches(config, rd), n)
  parts = [take(train_batches(config, rd, process_index=p, process_count=4), n)
           for p in range(4)]
  for step in range(n):
    for key in whole[step]:
      joined = np.concatenate([parts[p][step][key] for p in range(4)])
      np.testing.assert_array_equal(joined, whole[step][key])
    assert parts[0][step]["inputs"].shape == (2, 64)
    if mode == "homogeneous":  # every process trains the same expert at a step
      assert len({int(parts[p][step]["cluster"][0]) for p in range(4)}) == 1


def test_prepare_is_idempotent(run):
  config, rd, workdir = run
  again = pipeline.prepare_run_data(config, workdir, progress=False)
  np.testing.assert_array_equal(again.train.tokens, rd.train.tokens)
  np.testing.assert_array_equal(again.clusters.centroids, rd.clusters.centroids)
  follower = pipeline.prepare_run_data(config, workdir, process_index=1, wait_timeout_s=5,
                                       progress=False)
  np.testing.assert_array_equal(follower.train.cluster, rd.train.cluster)


def test_eval_batches_finite_and_deterministic(run):
  config, rd, _ = run
  a, b = list(eval_batches(config, rd)), list(eval_batches(config, rd))
  assert 1 <= len(a) <= config.data.eval_batches
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["targets"], y["targets"])
  assert a[0]["inputs"].shape == (8, 64)
  halves = [list(eval_batches(config, rd, process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([halves[0][0]["inputs"], halves[1][0]["inputs"]]),
                                a[0]["inputs"])


def test_domain_batches_subsets(run):
  config, rd, _ = run
  domain = corpus_lib.list_domains(rd.root)[0]
  cluster = pipeline.domain_cluster(rd, domain)

  def domain_batches(**kw):
    return batches.domain_batches(rd, domain, "train", batch_size=config.data.batch_size,
                                  seed=config.seed, **kw)
  small = list(domain_batches(max_tokens=1000, repeat=False))
  assert sum(float(b["mask"].sum()) for b in small) == 1000
  assert all((b["cluster"] == cluster).all() for b in small)
  big = list(domain_batches(max_tokens=3000, repeat=False))
  np.testing.assert_array_equal(big[0]["inputs"][0], small[0]["inputs"][0])  # nested subsets
  it = domain_batches(max_tokens=3000)
  assert len(take(it, 10)) == 10  # training split repeats
  config_d = tiny_config(domain=domain)
  ev = list(eval_batches(config_d, rd, split="test"))
  assert 1 <= len(ev) <= config.data.eval_batches


def test_domain_cluster_rules(run):
  """'split' counts every window of the whole train split once (the tag of domain batches);
  'budget' weighs the windows of the max_tokens prefix by their tokens (expert choice)."""
  _, rd, _ = run
  domain = corpus_lib.list_domains(rd.root)[0]
  wins = packing.windows_of(pipeline.split_docs(rd, "train", domain), rd.window)
  ids = pipeline.window_clusters(rd.clusters, rd.tokenizer, wins)
  assert pipeline.domain_cluster(rd, domain) == int(np.bincount(ids, minlength=4).argmax())
  prefix = packing.windows_of(pipeline.domain_docs(rd, domain, "train", 1000), rd.window)
  ids = pipeline.window_clusters(rd.clusters, rd.tokenizer, prefix)
  tokens = np.bincount(ids, weights=[len(w) for w in prefix], minlength=4)
  hist = pipeline.domain_histogram(rd, domain, rule="budget", max_tokens=1000)
  np.testing.assert_allclose(hist, tokens / tokens.sum())
  assert pipeline.domain_cluster(rd, domain, rule="budget", max_tokens=1000) == hist.argmax()
  with pytest.raises(ValueError, match="rule"):
    pipeline.domain_histogram(rd, domain, rule="windows")


def test_copy_prepared(run, tmp_path):
  config, rd, workdir = run
  dst = str(tmp_path / "copy")
  settings = pipeline.data_settings(config)
  assert pipeline.prepared_with(workdir, settings) and not pipeline.is_prepared(dst)
  pipeline.copy_prepared(workdir, dst)
  assert pipeline.prepared_with(dst, settings)
  assert not pipeline.prepared_with(dst, dict(settings, k=5))
  again = pipeline.prepare_run_data(config, dst, progress=False)
  np.testing.assert_array_equal(again.train.tokens, rd.train.tokens)


WORKERS = """
import sys
from absl import flags
from pn_jax.data import DataError, pipeline
from pn_jax.data import batches as batches_lib
from test_data_pipeline import tiny_config
config = tiny_config()
rd = pipeline.prepare_run_data(config, sys.argv[1], progress=False)
def batches(workers):
  it = batches_lib.train_batches(rd, batch_size=8, mode="mixed", seed=0, num_workers=workers)
  return [next(it)["inputs"] for _ in range(5)]
try:
  batches(2)
  sys.exit("no error without parsed flags")
except DataError as e:
  assert "absl" in str(e), e
flags.FLAGS(sys.argv[:1])  # what an absl app's main has done
for a, b in zip(batches(0), batches(2)):
  assert (a == b).all()
print("same")
"""


def test_worker_processes_give_the_same_batches(run):
  """num_workers > 0 (grain worker processes) needs absl flags parsed, which the CLIs do; it
  then yields the in-process stream. A subprocess: parsing flags here would leak into others."""
  import os
  import subprocess
  import sys
  _, _, workdir = run
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
  out = subprocess.run([sys.executable, "-c", WORKERS, workdir], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "same" in out.stdout, out.stderr[-3000:]


def test_assign_clusters(run):
  _, rd, _ = run
  texts = corpus_lib.load_texts(rd.root, "validation")[:10]
  a = pipeline.assign_clusters(rd, texts)
  assert a.dtype == np.int32 and a.shape == (10,) and ((a >= 0) & (a < 4)).all()
  np.testing.assert_array_equal(a, pipeline.assign_clusters(rd, texts))


def test_byte_tokenizer_run(tmp_path):
  config = tiny_config(tokenizer="byte", seq_len=32, cluster_window=1024)
  config.model.vocab_size = 259
  config.model.k = 2
  rd = pipeline.prepare_run_data(config, str(tmp_path), progress=False)
  assert rd.tokenizer.vocab_size == 259
  b = next(train_batches(config, rd))
  assert b["inputs"].max() < 259 and b["inputs"].shape == (8, 32)


def test_balanced_clusters_give_the_training_windows_equal_clusters(tmp_path):
  """data.cluster_balance=True: the generic training windows' clusters within one of each other
  (the default's are not, on the bundled corpus), recorded in the clusters' meta; a workdir made
  with one setting refuses the other."""
  plain = pipeline.prepare_run_data(tiny_config(), str(tmp_path / "plain"), progress=False)
  sizes = plain.stats["cluster_windows"]
  assert max(sizes) - min(sizes) > 1  # the fixture's k-means clusters are lopsided
  config = tiny_config(cluster_balance=True)
  rd = pipeline.prepare_run_data(config, str(tmp_path / "bal"), progress=False)
  sizes = rd.stats["cluster_windows"]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(plain.stats["cluster_windows"])
  assert rd.clusters.meta["balanced"] is True
  with pytest.raises(DataError, match="balanced"):
    pipeline.prepare_run_data(tiny_config(), str(tmp_path / "bal"), progress=False)
