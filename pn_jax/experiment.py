"""The comparison experiment: pretrain every method, specialize each on each domain and budget,
write docs/results.md and docs/results_ppl_vs_cost.png.

    python -m pn_jax.experiment --config=configs/experiments/cpu_small.py --root=runs/exp

Every stage is an ordinary run under --root (pretrain/<method>, specialize/<method>/<domain>-<n>,
...) made with the same mode functions as the CLI, so any cell of the table can be re-run or
inspected alone. Finished stages are skipped on a rerun (a pretraining run resumes from its
checkpoint; a specialization is done when its specialize.json exists).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pn_jax import config as config_lib
from pn_jax import modes
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import tokenizer as tok_lib
from pn_jax.train import flops as flops_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Table names; a method a config adds without one here prints as its key.
LABELS = {"slm": "SLM", "mix": "SLM-mix", "pn": "PN", "llm": "LLM", "slm_d": "SLM-d",
          "slm_is": "SLM-is", "pn_lrs": "PN, T lr/sqrt(h)", "pn_mixed": "PN, mixed batches",
          "mix_mixed": "SLM-mix, mixed batches"}


def label(method: str) -> str:
  return LABELS.get(method, method)


def load_run_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/pn.py:tiny' (relative to the repo) -> that file's get_config('tiny')."""
  return config_lib.load_config(os.path.join(REPO, spec))


def apply_overrides(config: ml_collections.ConfigDict, overrides: str) -> None:
  for item in filter(None, overrides.split(",")):
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)


# --- corpus ---------------------------------------------------------------------------------

def _take(docs: list[dict], chars: int, seed: int) -> list[dict]:
  order = np.random.default_rng(seed).permutation(len(docs))
  out, total = [], 0
  for i in order:
    if total >= chars:
      break
    out.append(docs[i])
    total += len(docs[i]["text"])
  return out


def build_corpus(exp, root: str) -> str:
  """A seeded subset of the source corpus in the prepared-corpus layout. Each part (the generic
  set, each domain) is written once (each split file atomically), and its subset depends only
  on the seed: adding a domain to an experiment adds that domain's files and keeps everything
  trained on the rest (tokenizer, pretraining, finished cells) valid."""
  src = corpus_lib.resolve_root(exp.source, "data_cache")
  out = os.path.join(root, "corpus")
  for domain in (None, *exp.domains):
    for split in corpus_lib.SPLITS:
      path = corpus_lib.split_path(out, split, domain)
      if os.path.exists(path):
        continue
      chars = exp.heldout_chars if split != "train" else (
          exp.domain_train_chars if domain else exp.generic_chars)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      docs = corpus_lib.read_docs(corpus_lib.split_path(src, split, domain))
      corpus_lib.write_docs(path, _take(docs, chars, exp.seed))
  return out


def shared_tokenizer(exp, corpus: str, root: str) -> str:
  """One tokenizer for every method, so perplexities are per the same tokens. With
  `exp.tokenizer_from` (another experiment's tokenizer.model) perplexities are also comparable
  across experiments: with the same seed and domain sizes their domain test sets are identical."""
  path = os.path.join(root, "tokenizer.model")
  if os.path.exists(path):
    return path
  if exp.get("tokenizer_from"):
    if not os.path.isfile(exp.tokenizer_from):
      raise config_lib.ConfigError(f"tokenizer_from: no tokenizer at {exp.tokenizer_from!r}")
    shutil.copyfile(exp.tokenizer_from, path + ".tmp")
    os.replace(path + ".tmp", path)
  else:
    texts = corpus_lib.load_texts(corpus, "train")
    tok_lib.train_tokenizer(texts, path, exp.vocab_size, exp.seed)
  return path


# --- stages ---------------------------------------------------------------------------------

def _timed(fn, *args):
  t0 = time.perf_counter()
  result = fn(*args)
  return result, time.perf_counter() - t0


def pretrain_config(exp, spec, overrides, corpus, tokenizer, root=""):
  """`root`: the experiment root, whose data_cache/ every pretraining run (the importance-sampling
  ones too) shares: the corpus is tokenized, embedded and clustered once per experiment."""
  c = load_run_config(spec)
  apply_overrides(c, overrides)
  c.seed = exp.seed
  c.model.update(vocab_size=exp.vocab_size, max_len=max(c.model.max_len, exp.seq_len))
  c.data.update(corpus=corpus, tokenizer_path=tokenizer, seq_len=exp.seq_len,
                batch_size=exp.batch_size, eval_batches=exp.eval_batches)
  steps = int(exp.pretrain_tokens // (exp.batch_size * exp.seq_len))
  c.optim.update(lr=exp.pretrain_lr, warmup_steps=max(steps // 20, 1))
  c.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, log_every=25,
                 progress_bar=False, async_checkpoint=False)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  if root:
    c.data.cache_dir = os.path.join(root, "data_cache")
  return c


def pretrain_flops(c) -> float:
  return c.train.steps * flops_lib.train_flops_per_step(c.model, c.data.batch_size,
                                                         c.data.seq_len)


def finetune_config(exp, init_from, domain, budget, teacher=""):
  c = load_run_config("configs/distill.py:tiny" if teacher else "configs/finetune.py:tiny")
  f = exp.finetune
  c.seed = exp.seed
  c.init_from = init_from
  c.distill.teacher = teacher
  c.optim.update(lr=f.lr)
  c.train.update(steps=f.steps, eval_every=f.eval_every, checkpoint_every=f.eval_every,
                 early_stop_patience=f.early_stop_patience, progress_bar=False,
                 async_checkpoint=False, log_every=10)
  c.data.update(domain=domain, domain_tokens=int(budget), batch_size=exp.batch_size,
                eval_batches=f.eval_batches)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def specialize(exp, init_from, workdir, domain, budget, teacher="") -> dict:
  done = os.path.join(workdir, "specialize.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  result, _ = _timed(modes.specialize, finetune_config(exp, init_from, domain, budget, teacher),
                     workdir)
  return result


# Settings every finished stage depends on: a root's results are reused only if they match.
# (domains, budgets and new methods may be added: they only add stages.)
_REUSE_KEYS = ("source", "seed", "generic_chars", "heldout_chars", "domain_train_chars",
               "vocab_size", "seq_len", "batch_size", "pretrain_tokens", "pretrain_lr",
               "eval_batches", "finetune", "distill", "tokenizer_from")


def check_reusable(saved_exp: dict, exp) -> None:
  """ConfigError naming each setting that differs from the one the root's results were made
  with: silently mixing stages of two configurations would corrupt the table."""
  norm = lambda v: json.loads(json.dumps(v.to_dict() if hasattr(v, "to_dict") else v))
  changed = [(k, saved_exp[k]) for k in _REUSE_KEYS
             if k in saved_exp and norm(saved_exp[k]) != norm(exp[k])]
  changed += [(f"methods.{m}", spec) for m, spec in saved_exp.get("methods", {}).items()
              if m in exp.methods and norm(spec) != norm(exp.methods[m])]
  if changed:
    raise config_lib.ConfigError(
        "this experiment root holds results made with other settings ("
        + ", ".join(f"{k}: {v!r}" for k, v in changed)
        + "); use a new --root (or restore those settings to add stages to this one)")


def run(exp, root: str) -> dict:
  results = {"pretrain": {}, "specialize": {}, "exp": exp.to_dict()}
  path = os.path.join(root, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    check_reusable(saved.get("exp", {}), exp)
    results.update({k: v for k, v in saved.items() if k != "exp"})
  os.makedirs(root, exist_ok=True)
  corpus = build_corpus(exp, root)
  tokenizer = shared_tokenizer(exp, corpus, root)

  def save():  # atomically: a kill mid-write must not lose the finished stages
    corpus_lib.write_json(path, results)

  for name, (spec, overrides) in exp.methods.items():
    if name == "slm_is":
      continue  # per domain, below
    c = pretrain_config(exp, spec, overrides, corpus, tokenizer, root)
    workdir = os.path.join(root, "pretrain", name)
    if name not in results["pretrain"]:
      out, secs = _timed(modes.pretrain, c, workdir)
      results["pretrain"][name] = {"flops": pretrain_flops(c), "seconds": secs,
                                   "generic_valid_ppl": out["eval_perplexity"],
                                   "steps": out["step"], "tokens": exp.pretrain_tokens}
      save()

  # The LLM first (SLM-d's teacher), then the config's order; SLM-is pretrains per cell below.
  order = sorted((m for m in exp.methods if m != "slm_is"), key=lambda m: m != "llm")
  for domain in exp.domains:
    for budget in exp.budgets:
      cell = f"{domain}/{budget}"
      res = results["specialize"].setdefault(cell, {})
      for name in order:
        if name not in res:
          res[name] = specialize(exp, os.path.join(root, "pretrain", name),
                                 os.path.join(root, "specialize", name, f"{domain}-{budget}"),
                                 domain, budget)
          save()
      if exp.distill and "slm_d" not in res:
        res["slm_d"] = specialize(
            exp, os.path.join(root, "pretrain", "slm"),
            os.path.join(root, "specialize", "slm_d", f"{domain}-{budget}"), domain, budget,
            teacher=os.path.join(root, "specialize", "llm", f"{domain}-{budget}"))
        save()
      if "slm_is" in exp.methods and "slm_is" not in res:
        spec, overrides = exp.methods.slm_is
        c = pretrain_config(exp, spec, overrides, corpus, tokenizer, root)
        c.data.update(domain=domain, domain_tokens=int(budget))
        pre_dir = os.path.join(root, "pretrain_is", f"{domain}-{budget}")
        pre_is = results.setdefault("pretrain_is", {})
        if cell not in pre_is:
          out, secs = _timed(modes.importance, c, pre_dir)
          pre_is[cell] = dict(is_pretrain_flops=pretrain_flops(c), is_pretrain_seconds=secs,
                              is_pretrain_domain_valid_ppl=out["eval_perplexity"],
                              ess_sequences=out["ess_sequences"])
          save()
        spec_out = specialize(exp, pre_dir,
                              os.path.join(root, "specialize", "slm_is", f"{domain}-{budget}"),
                              domain, budget)
        spec_out.update(pre_is[cell])
        res["slm_is"] = spec_out
        save()
  return results


# --- report ------------------------------------------------------------------------------------

def macro(cells: list[dict], key: str) -> float:
  """exp(mean over domains of the per-token NLL): the paper's macro-averaged perplexity."""
  return float(np.exp(np.mean([np.log(c[key]) for c in cells])))


def table_rows(results, exp):
  known = ["slm", "mix", "pn", "llm", "slm_d", "slm_is"]
  methods = [m for m in known + [m for m in exp.methods if m not in known]
             if all(m in results["specialize"].get(f"{d}/{b}", {})
                    for d in exp.domains for b in exp.budgets)]
  rows = []
  for m in methods:
    row = {"method": m}
    for b in exp.budgets:
      cells = [results["specialize"][f"{d}/{b}"][m] for d in exp.domains]
      row[b] = {"macro": macro(cells, "test_ppl"),
                "per_domain": {d: c["test_ppl"] for d, c in zip(exp.domains, cells)},
                "noft": macro(cells, "noft_test_ppl"),
                "spec_flops": float(np.mean([c["specialize_flops"] for c in cells])),
                "spec_seconds": float(np.mean([c["fit_seconds"] for c in cells])),
                "steps": float(np.mean([c["steps"] for c in cells]))}
      if m == "slm_is":
        row[b]["is_flops"] = float(np.mean([c["is_pretrain_flops"] for c in cells]))
        row[b]["is_seconds"] = float(np.mean([c["is_pretrain_seconds"] for c in cells]))
    rows.append(row)
  return rows


def vs_slm_table(rows, exp) -> list[str]:
  """Each method's macro perplexity relative to the SLM's (the paper's comparison), and on how
  many domains it beats the SLM (a sign test's count: a few % macro can be one domain)."""
  if not any(r["method"] == "slm" for r in rows):
    return []
  slm = rows_by(rows, "slm")
  out = ["| method | " + " | ".join(f"vs SLM, ft {b:.0e} | domains better ({b:.0e})"
                                   for b in exp.budgets) + " |",
         "|---" * (1 + 2 * len(exp.budgets)) + "|"]
  for r in rows:
    if r["method"] == "slm":
      continue
    cells = []
    for b in exp.budgets:
      better = sum(r[b]["per_domain"][d] < slm[b]["per_domain"][d] for d in exp.domains)
      cells += [f"{100 * (r[b]['macro'] / slm[b]['macro'] - 1):+.1f}%",
                f"{better}/{len(exp.domains)}"]
    out.append(f"| {label(r['method'])} | " + " | ".join(cells) + " |")
  return out


def pretrain_cost(results, m, row, budget):
  """Pretraining FLOPs and seconds attributable to one domain's model."""
  if m == "slm_is":
    return row[budget]["is_flops"], row[budget]["is_seconds"]
  if m == "slm_d":  # the student's and the teacher's pretraining
    p, q = results["pretrain"]["slm"], results["pretrain"]["llm"]
    return p["flops"] + q["flops"], p["seconds"] + q["seconds"]
  p = results["pretrain"][m]
  return p["flops"], p["seconds"]


def write_report(results, exp, docs: str, command: str, tag: str = "",
                 figure: str = "results_ppl_vs_cost.png") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = table_rows(results, exp)
  os.makedirs(docs, exist_ok=True)
  b_small, b_large = exp.budgets[0], exp.budgets[-1]
  lines = [
      "| method | pretrain FLOPs | pretrain s | generic valid ppl | no ft | "
      + " | ".join(f"ft {b:.0e}" for b in exp.budgets) + " | spec FLOPs (small / large) | "
      "spec s (small / large) |",
      "|---" * (7 + len(exp.budgets)) + "|"]
  for r in rows:
    m = r["method"]
    pf, ps = pretrain_cost(results, m, r, b_large)
    gen = (f'{results["pretrain"][m]["generic_valid_ppl"]:.2f}' if m in results["pretrain"] else
           f'{results["pretrain"]["slm"]["generic_valid_ppl"]:.2f}' if m == "slm_d" else "-")
    sf = [r[b]["spec_flops"] + (rows_by(rows, "llm")[b]["spec_flops"] if m == "slm_d" else 0)
          for b in (b_small, b_large)]
    lines.append(
        f"| {label(m)} | {pf:.2e} | {ps:.0f} | {gen} | {r[b_large]['noft']:.2f} | "
        + " | ".join(f"{r[b]['macro']:.2f}" for b in exp.budgets)
        + f" | {sf[0]:.2e} / {sf[1]:.2e} | "
        f"{r[b_small]['spec_seconds']:.0f} / {r[b_large]['spec_seconds']:.0f} |")
  per_domain = ["| method | budget | " + " | ".join(exp.domains) + " |",
                "|---" * (2 + len(exp.domains)) + "|"]
  for r in rows:
    for b in exp.budgets:
      per_domain.append(f"| {label(r['method'])} | {b:.0e} | "
                        + " | ".join(f"{r[b]['per_domain'][d]:.2f}" for d in exp.domains) + " |")
  versus = vs_slm_table(rows, exp)

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for b, marker in zip(exp.budgets, ("o", "s", "^")):
    for r in rows:
      pf, _ = pretrain_cost(results, r["method"], r, b)
      ax.scatter(pf, r[b]["macro"], marker=marker, color=f"C{rows.index(r)}",
                 label=f"{label(r['method'])}" if b == b_small else None)
      ax.annotate(f"{b:.0e}", (pf, r[b]["macro"]), fontsize=6, xytext=(3, 2),
                  textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("pretraining FLOPs per specialized model (SLM-is: per domain; SLM-d: + teacher)")
  ax.set_ylabel("macro-averaged test perplexity after fine-tuning")
  shapes = ", ".join(f"{m}: {b:.0e}" for b, m in zip(exp.budgets, ("o", "s", "^")))
  ax.set_title(f"Specialized perplexity vs pretraining cost ({shapes} domain tokens)",
               fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(docs, figure), dpi=130)
  plt.close(fig)

  begin, end = f"<!-- experiment {tag}:begin (written by pn_jax.experiment) -->", \
      f"<!-- experiment {tag}:end -->"
  auto = "\n".join([
      begin, "", f"Command: `{command}` (config: `{exp_summary(exp)}`).", "",
      "Macro-averaged test perplexity over the domains (exp of the mean per-token NLL), the "
      "cost of each method, then the per-domain numbers. FLOPs from pn_jax.train.flops "
      "(6 N per token + attention); seconds are wall-clock on this machine.", "",
      *lines, "", *versus, "", *per_domain, "", f"![ppl vs cost]({figure})", "", end])
  path = os.path.join(docs, "results.md")
  text = open(path).read() if os.path.exists(path) else f"# Results\n\n{begin}\n{end}\n"
  if begin in text and end in text:
    text = text[:text.index(begin)] + auto + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + "\n\n" + auto + "\n"
  with open(path, "w") as f:
    f.write(text)
  print("\n".join(lines + [""] + versus))
  print("\n".join(per_domain))


def exp_summary(exp) -> str:
  keys = ("source", "domains", "budgets", "pretrain_tokens", "vocab_size", "seq_len",
          "batch_size", "generic_chars")
  return ", ".join(f"{k}={exp[k]}" for k in keys)


def rows_by(rows, method):
  for r in rows:
    if r["method"] == method:
      return r
  raise KeyError(method)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  exp, root = FLAGS.config, FLAGS.root
  cache = os.path.join(os.path.abspath(root), "jit_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  t0 = time.perf_counter()
  if FLAGS.report_only:
    with open(os.path.join(root, "results.json")) as f:
      results = json.load(f)
  else:
    results = run(exp, root)
    results["wall_seconds_this_invocation"] = time.perf_counter() - t0
    corpus_lib.write_json(os.path.join(root, "results.json"), results)
  # The command that makes these results (a --report_only rewrite shows the run's command).
  args = [a for a in os.sys.argv[1:] if not a.startswith(("--report_only", "--docs"))]
  write_report(results, exp, FLAGS.docs, " ".join(["python -m pn_jax.experiment", *args]),
               tag=os.path.basename(os.path.normpath(root)), figure=FLAGS.figure)
  logging.info("experiment done in %.0f s", time.perf_counter() - t0)


def define_flags():
  """Defined here, not at import: tests import this module next to other absl entry points."""
  config_flags.DEFINE_config_file("config", None, "configs/experiments/<name>.py")
  flags.DEFINE_string("root", "runs/exp", "Directory for every run of the experiment.")
  flags.DEFINE_string("docs", "docs", "Where results.md and the figure go.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the report from <root>/results.json "
                    "(e.g. for the finished cells of a partial run, with --config.domains "
                    "restricted to them).")
  flags.DEFINE_string("figure", "results_ppl_vs_cost.png", "Figure file name under --docs.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
