"""`python -m pn_jax.data report`: token counts per corpus and cluster sizes, as Markdown.

Trains (or reuses) the run tokenizer and clusters exactly as a training run would
(`prepare_run_data` with a config built from `pn_jax.config.base_config()`), so the numbers in
docs/data.md are reproducible with one command.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pn_jax.data import corpus as corpus_lib
from pn_jax.data import packing
from pn_jax.data import pipeline


def report_config(corpus: str, data_dir: str, k: int, vocab_size: int, seq_len: int,
                  embedding: str, tokenizer_path: str = "", balanced: bool = False):
  """The run config whose prepared data the report describes (base_config with these values)."""
  from pn_jax.config import base_config
  c = base_config()
  c.data.corpus, c.data.data_dir = corpus, data_dir
  c.model.k, c.model.vocab_size = k, vocab_size
  c.data.seq_len = seq_len
  c.model.max_len = max(c.model.max_len, seq_len)
  c.data.cluster_embedding = embedding
  c.data.tokenizer_path = tokenizer_path
  c.data.cluster_balance = balanced
  return c


def report(corpus: str, data_dir: str, workdir: str, ks=(4, 16), vocab_size: int = 32_000,
           seq_len: int = 1024, embedding: str = "tfidf", domains: bool = True,
           balanced: bool = False) -> str:
  """`balanced`: each k also with balanced k-means (its table named "<k> balanced"); the runs
  share one artefact cache (tokens, embeddings) under `workdir`."""
  lines, rds = [], {}
  tok_path = ""
  runs = [(k, b) for k in ks for b in ((False, True) if balanced else (False,))]
  for k, bal in runs:
    t0 = time.time()
    config = report_config(corpus, data_dir, k, vocab_size, seq_len, embedding, tok_path, bal)
    if balanced:
      config.data.cache_dir = os.path.join(workdir, "cache")
    name = f"k{k}" + ("_balanced" if bal else "")
    rd = pipeline.prepare_run_data(config, os.path.join(workdir, name))
    tok_path = tok_path or os.path.join(workdir, name, "tokenizer.model")
    rds[f"{k} balanced" if bal else k] = (rd, time.time() - t0)
  ks = list(rds)
  rd0 = rds[ks[0]][0]
  lines.append(f"Tokenizer: sentencepiece unigram, {rd0.tokenizer.vocab_size} pieces, trained on "
               "the generic training split.\n")
  lines.append("| corpus | split | documents | MB | tokens |")
  lines.append("|---|---|---|---|---|")
  names = ["generic"] + (corpus_lib.list_domains(rd0.root) if domains else [])
  for name in names:
    for split in corpus_lib.SPLITS:
      texts = corpus_lib.load_texts(rd0.root, split, "" if name == "generic" else name)
      if name == "generic" and split == "train":
        n_tok = rd0.stats["tokens"] - rd0.stats["documents"]  # without the eos per document
      else:
        n_tok = sum(len(x) for x in rd0.tokenizer.encode_batch(texts))
      mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
      lines.append(f"| {name} | {split} | {len(texts):,} | {mb:.2f} | {n_tok:,} |")
  for k in ks:
    rd, secs = rds[k]
    s = rd.stats
    win = np.asarray(s["cluster_windows"])
    tokens = np.asarray(s["cluster_tokens"])
    lines.append(f"\nk={k} ({rd.clusters.embedding}, {rd.window}-token windows, "
                 f"{s['windows']:,} windows, fitted in {secs:.0f} s incl. tokenization):\n")
    lines.append("| cluster | windows | tokens | share | top terms |")
    lines.append("|---|---|---|---|---|")
    terms = top_terms(rd.clusters, 6)
    for c in range(rd.clusters.k):
      lines.append(f"| {c} | {win[c]:,} | {tokens[c]:,} | {tokens[c] / tokens.sum():.1%} | "
                   f"{', '.join(terms[c]) if terms else ''} |")
    share = tokens / tokens.sum()
    lines.append(f"\nSizes (k={k}): windows per cluster min {win.min():,}, median "
                 f"{int(np.median(win)):,}, max {win.max():,}; token share min {share.min():.1%},"
                 f" max {share.max():.1%}.")
    if domains:
      lines.append(f"\nDomain -> most frequent cluster (k={k}): " + ", ".join(
          f"{d}: {pipeline.domain_cluster(rd, d)}" for d in corpus_lib.list_domains(rd.root)))
      lines += ["", *split_clusters_table(rd, k)]
  return "\n".join(lines)


def split_clusters_table(run_data, k) -> list[str]:
  """Does each split of a domain fall where its training split does? PN serves the expert of
  the training split's most frequent cluster: a validation or test split spread over other
  clusters is text that expert was not specialized for (and that model selection on validation
  does not see, if only the test split moves)."""
  out = [f"Domain splits by cluster (k={k}): the share of each split's windows in the training "
         "split's most frequent cluster (the served expert), and each split's top 3 clusters.", "",
         "| domain | served cluster | train | validation | test | top 3: train | validation | "
         "test |", "|---" * 8 + "|"]
  for d in corpus_lib.list_domains(run_data.root):
    hist = {s: pipeline.split_cluster_shares(run_data, d, s) for s in corpus_lib.SPLITS}
    served = int(np.argmax(hist["train"]))
    top = lambda h: ", ".join(f"{c} ({h[c]:.0%})" for c in np.argsort(-h, kind="stable")[:3])
    out.append(f"| {d} | {served} | " + " | ".join(f"{hist[s][served]:.0%}" for s in corpus_lib.SPLITS)
               + " | " + " | ".join(top(hist[s]) for s in corpus_lib.SPLITS) + " |")
  return out


def top_terms(model, n: int) -> list[list[str]]:
  """Words with the largest weight in each centroid (TF-IDF embedding only)."""
  if model.embedding != "tfidf":
    return []
  weights = model.centroids @ model.arrays["svd"]  # [k, V] back in word space
  vocab = model.arrays["vocab"]
  return [[str(vocab[i]) for i in np.argsort(-w)[:n]] for w in weights]


def compare_embeddings(run_data, k: int, sample: int = 8000, seed: int = 0) -> str:
  """TF-IDF vs MiniLM k-means on a seeded sample of the run's training windows (Markdown).

  Reports agreement between the two clusterings (adjusted Rand index, NMI) and how well each
  recovers the source package of a window (NMI with the source, size-weighted purity).
  """
  from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
  from pn_jax.data import clusters as clusters_lib
  docs = corpus_lib.read_docs(corpus_lib.split_path(run_data.root, "train"))
  docs = [d for d in docs if d["text"].strip()]
  tok = run_data.tokenizer
  ids = packing.tokenize_docs(tok, [d["text"] for d in docs])
  wins, src = [], []
  for d, t in zip(docs, ids):
    for i in range(0, len(t), run_data.window):
      wins.append(t[i:i + run_data.window])
      src.append(d.get("source", "").split(":")[0])
  pick = np.sort(np.random.default_rng(seed).choice(len(wins), min(sample, len(wins)),
                                                    replace=False))
  texts = [tok.decode(wins[i]) for i in pick]
  src = np.array([src[i] for i in pick])
  t0 = time.time()
  a_tfidf = clusters_lib.fit_clusters(texts, k, seed, embedding="tfidf").assign(texts)
  t_tfidf = time.time() - t0
  t0 = time.time()
  a_minilm = clusters_lib.fit_clusters(texts, k, seed, embedding="minilm").assign(texts)
  t_minilm = time.time() - t0

  def purity(a):
    return sum(collections_max(src[a == c]) for c in range(k)) / len(a)

  rows = [f"TF-IDF vs MiniLM, k={k}, {len(texts):,} windows of {run_data.window} tokens "
          f"(seeded sample of {len(wins):,}):\n",
          "| | tfidf | minilm |", "|---|---|---|",
          f"| fit + assign time | {t_tfidf:.0f} s | {t_minilm:.0f} s |",
          f"| NMI with source package | {normalized_mutual_info_score(src, a_tfidf):.3f} | "
          f"{normalized_mutual_info_score(src, a_minilm):.3f} |",
          f"| purity w.r.t. source package | {purity(a_tfidf):.3f} | {purity(a_minilm):.3f} |",
          f"| largest / smallest cluster | {np.bincount(a_tfidf, minlength=k).max()} / "
          f"{np.bincount(a_tfidf, minlength=k).min()} | "
          f"{np.bincount(a_minilm, minlength=k).max()} / "
          f"{np.bincount(a_minilm, minlength=k).min()} |",
          f"\nAgreement between the two: adjusted Rand {adjusted_rand_score(a_tfidf, a_minilm):.3f},"
          f" NMI {normalized_mutual_info_score(a_tfidf, a_minilm):.3f}."]
  return "\n".join(rows)


def collections_max(labels) -> int:
  if not len(labels):
    return 0
  _, counts = np.unique(labels, return_counts=True)
  return int(counts.max())
