"""`python -m pn_jax.data report`: token counts per corpus and cluster sizes, as Markdown.

Trains (or reuses) the run tokenizer and clusters exactly as a training run would
(`prepare_run_data` with a config built from `pn_jax.config.base_config()`), so the numbers in
docs/data.md are reproducible with one command.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from pn_jax.data import corpus as corpus_lib
from pn_jax.data import pipeline


def _config(corpus: str, data_dir: str, k: int, vocab_size: int, seq_len: int, embedding: str,
            tokenizer_path: str = ""):
  from pn_jax.config import base_config
  c = base_config()
  c.data.corpus, c.data.data_dir = corpus, data_dir
  c.model.k, c.model.vocab_size = k, vocab_size
  c.data.seq_len = seq_len
  c.model.max_len = max(c.model.max_len, seq_len)
  c.data.cluster_embedding = embedding
  c.data.tokenizer_path = tokenizer_path
  return c


def report(corpus: str, data_dir: str, workdir: str, ks=(4, 16), vocab_size: int = 32_000,
           seq_len: int = 1024, embedding: str = "tfidf", domains: bool = True) -> str:
  lines, rds = [], {}
  tok_path = ""
  for k in ks:
    t0 = time.time()
    config = _config(corpus, data_dir, k, vocab_size, seq_len, embedding, tok_path)
    rd = pipeline.prepare_run_data(config, os.path.join(workdir, f"k{k}"))
    tok_path = tok_path or os.path.join(workdir, f"k{k}", "tokenizer.model")
    rds[k] = (rd, time.time() - t0)
  rd0 = rds[ks[0]][0]
  manifest_path = os.path.join(rd0.root, "manifest.json")
  manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
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
    for c in range(k):
      lines.append(f"| {c} | {win[c]:,} | {tokens[c]:,} | {tokens[c] / tokens.sum():.1%} | "
                   f"{', '.join(terms[c]) if terms else ''} |")
    if domains:
      lines.append(f"\nDomain -> most frequent cluster (k={k}): " + ", ".join(
          f"{d}: {rd.domain_cluster(d)}" for d in corpus_lib.list_domains(rd.root)))
  del manifest
  return "\n".join(lines)


def top_terms(model, n: int) -> list[list[str]]:
  """Words with the largest weight in each centroid (TF-IDF embedding only)."""
  if model.embedding != "tfidf":
    return []
  weights = model.centroids @ model.arrays["svd"]  # [k, V] back in word space
  vocab = model.arrays["vocab"]
  return [[str(vocab[i]) for i in np.argsort(-w)[:n]] for w in weights]
