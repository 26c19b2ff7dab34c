"""Packing, batching, determinism, resume and per-process sharding on the bundled tiny corpus."""

import collections

import numpy as np
import pytest

from pn_jax.config import base_config
from pn_jax.data import corpus as corpus_lib
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
  return len(pipeline.batch_plan(run_data.train.cluster, config.data.batch_size,
                                 config.data.cluster_batching, None))


def all_doc_tokens(run_data):
  texts = corpus_lib.load_texts(run_data.root, "train")
  docs = pipeline.tokenize_docs(run_data.tokenizer, texts)
  return collections.Counter(np.concatenate(docs).tolist())


def test_batch_format(run):
  config, rd, _ = run
  b = next(pipeline.train_iterator(config, rd))
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
  for b in take(pipeline.train_iterator(config, rd), n):
    seen.update(b["targets"][b["mask"] > 0].tolist())
    if mode == "homogeneous":
      assert len(set(b["cluster"].tolist())) == 1  # one cluster per global batch
  assert seen == all_doc_tokens(rd)  # no token lost or duplicated across the epoch
  assert sum(seen.values()) == rd.stats["tokens"] == rd.train.num_targets


def test_sequence_cluster_matches_assignment(run):
  """Each cluster's sequences are exactly bos + the windows k-means assigned to that cluster."""
  _, rd, _ = run
  tok, p = rd.tokenizer, rd.train
  docs = pipeline.tokenize_docs(tok, corpus_lib.load_texts(rd.root, "train"))
  wins = pipeline.windows_of(docs, rd.window)
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
      pipeline.train_iterator(config, rd), n))
  sizes = np.bincount(rd.train.cluster, minlength=4)
  expected = {c: -(-int(sizes[c]) // 8) for c in range(4) if sizes[c]}
  assert dict(counts) == expected


def test_deterministic_and_reshuffled_per_epoch(run):
  config, rd, _ = run
  n = epoch_len(config, rd)
  a = take(pipeline.train_iterator(config, rd), n + 3)
  b = take(pipeline.train_iterator(config, rd), n + 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not all(np.array_equal(a[i]["inputs"], a[n + i]["inputs"]) for i in range(3))
  other = take(pipeline.train_iterator(tiny_config(), rd, process_index=0, process_count=1), 1)
  np.testing.assert_array_equal(other[0]["inputs"], a[0]["inputs"])
  config2 = tiny_config()
  config2.seed = 7
  c = take(pipeline.train_iterator(config2, rd), 3)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_resume_gives_same_batches(run):
  config, rd, _ = run
  it = pipeline.train_iterator(config, rd)
  take(it, 5)
  state = it.get_state()
  expected = take(it, 6)
  fresh = pipeline.train_iterator(config, rd)
  fresh.set_state(state)
  for x, y in zip(expected, take(fresh, 6)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("mode", ["homogeneous", "mixed"])
def test_process_shards_disjoint_and_covering(run, mode):
  config, rd, _ = run
  config = tiny_config(cluster_batching=mode)
  n = epoch_len(config, rd)
  whole = take(pipeline.train_iterator(config, rd), n)
  parts = [take(pipeline.train_iterator(config, rd, process_index=p, process_count=4), n)
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


def test_eval_iterator_finite_and_deterministic(run):
  config, rd, _ = run
  a, b = list(pipeline.eval_iterator(config, rd)), list(pipeline.eval_iterator(config, rd))
  assert 1 <= len(a) <= config.data.eval_batches
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["targets"], y["targets"])
  assert a[0]["inputs"].shape == (8, 64)
  halves = [list(pipeline.eval_iterator(config, rd, process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([halves[0][0]["inputs"], halves[1][0]["inputs"]]),
                                a[0]["inputs"])


def test_domain_iterator_subsets(run):
  config, rd, _ = run
  domain = corpus_lib.list_domains(rd.root)[0]
  cluster = rd.domain_cluster(domain)
  small = list(pipeline.domain_iterator(config, rd, domain, "train", max_tokens=1000,
                                        repeat=False))
  assert sum(float(b["mask"].sum()) for b in small) == 1000
  assert all((b["cluster"] == cluster).all() for b in small)
  big = list(pipeline.domain_iterator(config, rd, domain, "train", max_tokens=3000,
                                      repeat=False))
  np.testing.assert_array_equal(big[0]["inputs"][0], small[0]["inputs"][0])  # nested subsets
  it = pipeline.domain_iterator(config, rd, domain, "train", max_tokens=3000)
  assert len(take(it, 10)) == 10  # training split repeats
  config_d = tiny_config(domain=domain)
  ev = list(pipeline.eval_iterator(config_d, rd, split="test"))
  assert 1 <= len(ev) <= config.data.eval_batches


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
  b = next(pipeline.train_iterator(config, rd))
  assert b["inputs"].max() < 259 and b["inputs"].shape == (8, 32)
