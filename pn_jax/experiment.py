"""The comparison experiment: pretrain every method, specialize each on each domain and budget,
write docs/results.md and docs/results_ppl_vs_cost.png (pn_jax/experiment_report.py).

    python -m pn_jax.experiment --config=configs/experiments/cpu_small.py --root=runs/exp

Every stage is an ordinary run under --root (pretrain/<method>, specialize/<method>/<domain>-<n>,
specialize/<method>@<step>/... for the equal-time view) made with the same mode functions as
the CLI, so any cell of the table can be re-run or inspected alone. Finished stages are skipped
on a rerun (a pretraining run resumes from its checkpoint; a specialization is done when its
specialize.json exists). A signal (or --max_seconds) stops the experiment at a stage boundary
or through the running stage's own checkpoint-and-stop, with exit code 128 + signum; the same
command resumes it.

Two views of the comparison (the paper compares methods at equal pretraining GPU hours):
equal tokens (every method from its final checkpoint) and equal device time (every method
from its latest pretraining milestone within the reference method's training seconds).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from fractions import Fraction

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pn_jax import config as config_lib
from pn_jax import cli, modes, workdir_lock
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import packing
from pn_jax.data import tokenizer as tok_lib
from pn_jax.experiment_report import finetune_lr, merge_results, write_report
from pn_jax.train import costs as costs_lib
from pn_jax.train import flops as flops_lib
from pn_jax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/pn.py:tiny' (relative to the repo) -> that file's get_config('tiny')."""
  return config_lib.load_config(os.path.join(REPO, spec))


def override_items(overrides: str) -> list[tuple[str, str]]:
  """'a.b=1,c=x' -> [('a.b', '1'), ('c', 'x')]."""
  out = []
  for item in filter(None, overrides.split(",")):
    if "=" not in item:
      raise config_lib.ConfigError(f"override {item!r}: expected key=value")
    out.append(tuple(item.split("=", 1)))
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: str) -> None:
  """'a.b=1,c=x' -> config.a.b = 1, config.c = 'x' (each value cast to the key's type)."""
  for key, value in override_items(overrides):
    item = f"{key}={value}"
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    kind = type(node[leaf])
    if kind is bool:  # bool("False") is True
      if value.lower() not in ("true", "false"):
        raise config_lib.ConfigError(f"override {item!r}: {key} takes true or false")
      node[leaf] = value.lower() == "true"
    else:
      node[leaf] = kind(value)


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


# --- stopping: preemption and --max_seconds --------------------------------------------------

class Preempted(Exception):
  """A signal stopped the experiment: finished stages are saved, the interrupted one is not
  recorded (its workdir keeps its checkpoints, so a rerun resumes it). `main` exits with
  128 + signum, the code of a process killed by that signal, so a wrapper knows to call again."""

  def __init__(self, signum: int):
    super().__init__(f"stopped by {signal.Signals(signum).name}; rerun the same command to resume")
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopRequest:
  """SIGTERM/SIGINT received between stages, acted on at the next stage boundary.

  While a stage trains, the mode's own handler (pn_jax.train.loop) takes the signal, saves a
  checkpoint and returns a stop_reason "SIG..."; this object covers the rest of the time (data
  preparation, evaluation, between stages). A second signal exits at once, as in the loop.
  """

  def __init__(self):
    self.signum: int | None = None
    self.in_stage = False

  def install(self) -> "StopRequest":
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise SystemExit(128 + signum)
    logging.warning("%s: stopping at the next stage boundary", signal.Signals(signum).name)
    self.signum = signum

  def check(self) -> None:
    if self.signum is not None:
      raise Preempted(self.signum)

  def deadline(self, seconds: float) -> threading.Thread:
    """After `seconds` of wall clock, SIGTERM to this process, the way a scheduler preempts it.
    If a stage is still preparing (our handler is installed while it runs), the signal waits
    until its training loop has installed its own, so the stage checkpoints and stops instead
    of training to the end."""
    def fire():
      time.sleep(seconds)
      while self.in_stage and signal.getsignal(signal.SIGTERM) == self._handle:
        time.sleep(0.5)
      logging.warning("--max_seconds=%g reached: stopping", seconds)
      os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


def _stage(stop: StopRequest | None, fn, config, workdir) -> tuple[dict, float]:
  """Runs one stage (a mode function) -> (result, wall seconds); raises Preempted instead of
  returning a result that a signal cut short."""
  if stop:
    stop.check()
    stop.in_stage = True
  t0 = time.perf_counter()
  try:
    result = fn(config, workdir)
  finally:
    if stop:
      stop.in_stage = False
  reason = str(result.get("stop_reason", ""))
  if reason.startswith("SIG"):
    raise Preempted(signal.Signals[reason].value)
  return result, time.perf_counter() - t0


# --- stages ---------------------------------------------------------------------------------

def milestone_steps(steps: int, fractions) -> tuple[int, list[int]]:
  """-> (checkpoint/eval interval, the step of each milestone fraction). The interval is the
  fractions' common step (0.25, 0.5, ... -> steps/4, rounded); each milestone is the nearest
  multiple of it, and the last milestone (fraction 1) is the final step, which the loop always
  checkpoints even when the interval does not divide it."""
  fracs = [Fraction(f).limit_denominator(1000) for f in fractions]
  if not fracs or any(f <= 0 or f > 1 for f in fracs) or max(fracs) != 1:
    raise config_lib.ConfigError(f"exp.milestones={tuple(fractions)!r}: fractions of the "
                                 "pretraining steps in (0, 1], the last one 1.0")
  unit = fracs[0]
  for f in fracs[1:]:  # gcd of fractions: gcd of numerators / lcm of denominators
    unit = Fraction(math.gcd(unit.numerator, f.numerator),
                    math.lcm(unit.denominator, f.denominator))
  every = max(1, round(steps * unit))
  points = sorted({steps if f == 1 else min(max(round(f / unit) * every, every), steps)
                   for f in fracs})
  return every, points


def pretrain_config(exp, spec, overrides, corpus, tokenizer, root=""):
  """`root`: the experiment root, whose data_cache/ every pretraining run (the importance-sampling
  ones too) shares: the corpus is tokenized, embedded and clustered once per experiment
  (`exp.data_root`: that root's instead). The method's overrides are applied last, so a method
  may set its own seed or learning rate, and `pretrain_scale=f` trains it on f x the
  experiment's generic tokens; warmup and milestones follow its length."""
  c = load_run_config(spec)
  c.seed = exp.seed
  c.model.update(vocab_size=exp.vocab_size, max_len=max(c.model.max_len, exp.seq_len))
  c.data.update(corpus=corpus, tokenizer_path=tokenizer, seq_len=exp.seq_len,
                batch_size=exp.batch_size, eval_batches=exp.eval_batches)
  c.optim.lr = exp.pretrain_lr
  items = dict(override_items(overrides))  # a repeated key: its last value, as in apply
  # `pretrain_scale=<f>` (the experiment's, not a run config key): f x the generic tokens.
  tokens = exp.pretrain_tokens * float(items.pop("pretrain_scale", 1.0))
  c.train.steps = max(int(tokens // (exp.batch_size * exp.seq_len)), 1)
  apply_overrides(c, ",".join(f"{k}={v}" for k, v in items.items()))
  steps = c.train.steps
  if "optim.warmup_steps" not in items:
    c.optim.warmup_steps = max(steps // 20, 1)
  # Checkpoint and eval at every milestone (the equal-time view specializes from them) and keep
  # them all, plus room for 8 extra saves (preemptions, wall-clock saves) before the oldest goes.
  every, _ = milestone_steps(steps, exp.milestones)
  saves = steps // every + (steps % every != 0)
  c.train.update(eval_every=every, checkpoint_every=every,
                 keep_checkpoints=max(c.train.keep_checkpoints, saves + 8), log_every=25,
                 progress_bar=False, async_checkpoint=False)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  if root:
    c.data.cache_dir = os.path.join(exp.get("data_root") or root, "data_cache")
  return c


def pretrain_flops(c) -> float:
  return c.train.steps * flops_lib.train_flops_per_step(c.model, c.data.batch_size,
                                                         c.data.seq_len)


def finetune_config(exp, init_from, domain, budget, teacher="", init_step=0, overrides=""):
  """init_step: 0 = init_from's latest checkpoint, > 0 = that step (a pretraining milestone);
  overrides: the method's fine-tuning overrides (e.g. `specialize.select=lowest_loss`)."""
  c = load_run_config("configs/distill.py:tiny" if teacher else "configs/finetune.py:tiny")
  f = exp.finetune
  c.seed = exp.seed
  c.init_from = init_from
  c.init_step = int(init_step)
  c.distill.teacher = teacher
  c.optim.update(lr=finetune_lr(exp, budget))
  c.train.update(steps=f.steps, eval_every=f.eval_every, checkpoint_every=f.eval_every,
                 early_stop_patience=f.early_stop_patience, progress_bar=False,
                 async_checkpoint=False, log_every=10)
  c.data.update(domain=domain, domain_tokens=int(budget), batch_size=exp.batch_size,
                eval_batches=f.eval_batches)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  apply_overrides(c, overrides)
  return c


def specialize(exp, stop, init_from, workdir, domain, budget, teacher="", init_step=0,
               overrides="") -> dict:
  """One fine-tuning cell; done when its specialize.json exists (a preempted one has only
  checkpoints, and the mode resumes from them)."""
  done = os.path.join(workdir, "specialize.json")
  if os.path.exists(done):
    with open(done) as f:
      result = json.load(f)
  else:
    c = finetune_config(exp, init_from, domain, budget, teacher, init_step, overrides)
    result, _ = _stage(stop, modes.MODES["specialize"], c, workdir)
  if "hit_step_cap" not in result:  # specialize.json written before the mode recorded it
    result["hit_step_cap"] = (int(result["steps"]) >= exp.finetune.steps
                              and result.get("stop_reason") != "early_stopping")
  result["pretrain_step"] = int(init_step) or None  # None: the final checkpoint
  return result


# --- costs and the equal-time view ------------------------------------------------------------

def equal_time_steps(costs_by_method: dict[str, dict[int, float]], reference: str
                     ) -> dict[str, int]:
  """{method: {milestone step: cumulative train seconds}} -> {method: step}: each method's
  latest milestone whose cost is within the reference's total (its last milestone's), else its
  first milestone (the caller flags it as over budget)."""
  if reference not in costs_by_method:
    raise config_lib.ConfigError(f"exp.equal_time_reference={reference!r} has no pretraining "
                                 f"costs; methods with costs: {sorted(costs_by_method)}")
  ref = costs_by_method[reference]
  budget = ref[max(ref)]
  chosen = {}
  for method, seconds in costs_by_method.items():
    affordable = [s for s, secs in seconds.items() if secs <= budget]
    chosen[method] = max(affordable) if affordable else min(seconds)
  return chosen


def equal_time_choice(exp, results: dict, root: str) -> dict:
  """The equal-time view's pretraining checkpoint per method (step, train seconds, FLOPs,
  generic valid ppl there), from each run's costs.json at the milestone steps. SLM-d and
  SLM-is are compared at equal tokens only (their costs add up differently: teacher + student,
  per-domain pretraining), so they are not part of it. {} when the reference has no costs."""
  per_method, info = {}, {}
  owners = pretraining_owners(exp)
  for name, pre in results["pretrain"].items():
    costs = costs_lib.read_costs(os.path.join(root, "pretrain", owners.get(name, name)))
    if not costs:
      continue
    _, points = milestone_steps(pre["steps"], exp.milestones)
    steps = {int(s): v for s, v in costs["steps"].items()}
    if not all(p in steps for p in points):
      continue
    per_method[name] = {p: float(steps[p]["train_seconds"]) for p in points}
    info[name] = steps
  if exp.equal_time_reference not in per_method:
    return {}
  chosen = equal_time_steps(per_method, exp.equal_time_reference)
  ref = per_method[exp.equal_time_reference]
  budget = ref[max(ref)]
  out = {"reference": exp.equal_time_reference, "budget_seconds": budget, "methods": {}}
  for name, step in chosen.items():
    at = info[name][step]
    out["methods"][name] = {
        "step": step, "final": step == results["pretrain"][name]["steps"],
        "seconds": float(at["train_seconds"]), "flops": float(at["flops"]),
        "generic_valid_ppl": at.get("eval_perplexity"),
        "over_budget": float(at["train_seconds"]) > budget}
  return out


# Settings every finished stage depends on: a root's results are reused only if they match.
# (domains, budgets and new methods may be added: they only add stages.)
_REUSE_KEYS = ("source", "seed", "generic_chars", "heldout_chars", "domain_train_chars",
               "vocab_size", "seq_len", "batch_size", "pretrain_tokens", "pretrain_lr",
               "eval_batches", "finetune", "distill", "tokenizer_from", "milestones",
               "equal_time_reference")


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


def _final_costs(workdir: str, c) -> tuple[dict, dict]:
  """-> (the run's costs.json, {} if none; its entry for the final step c.train.steps, or {})."""
  costs = costs_lib.read_costs(workdir)
  return costs, costs.get("steps", {}).get(str(c.train.steps), {})


def pretrain_fit(workdir: str, last: int = 8) -> dict:
  """{train_loss_end: mean of the last `last` logged training losses, valid_loss_end: the last
  eval loss} from a run's metrics.jsonl ({} without one): the gap between them tells
  overfitting (repeated data) from a model that does not fit its data."""
  rows = metrics_lib.read_rows(os.path.join(workdir, metrics_lib.LOG))  # (skips a torn line)
  # (a window of skipped non-finite steps logs its loss as null)
  train = [r["loss"] for r in rows if r.get("split") == "train" and r["loss"] is not None][-last:]
  valid = [r["loss"] for r in rows if r.get("split") == "eval" and r["loss"] is not None]
  if not train or not valid:
    return {}
  return {"train_loss_end": float(np.mean(train)), "valid_loss_end": float(valid[-1])}


def add_pretrain_fit(results: dict, root: str) -> dict:
  """Fills in pretrain_fit for the records made before _pretrain_record kept it, from the
  pretraining runs under `root` (each method's own run, or the one it shares)."""
  groups = pretraining_groups(results.get("exp", {}).get("methods", {}))
  for name, record in results.get("pretrain", {}).items():
    if "train_loss_end" in record:
      continue
    sharing = next((g for g in groups if name in g), [name])
    # A saved config's methods may come back in another order: the run is under the name of
    # whichever method of the group trained it.
    for owner in sharing:
      fit = pretrain_fit(os.path.join(root, "pretrain", owner))
      if fit:
        record.update(fit)
        break
  return results


def _pretrain_record(exp, c, out: dict, secs: float, workdir: str) -> dict:
  costs, final = _final_costs(workdir, c)
  ppl = out.get("eval_perplexity", final.get("eval_perplexity"))
  return {"flops": pretrain_flops(c), "seconds": secs, "generic_valid_ppl": ppl,
          "steps": c.train.steps,
          "tokens": c.train.steps * c.data.batch_size * c.data.seq_len,
          "train_seconds": final.get("train_seconds"), "device": costs.get("device"),
          "device_count": costs.get("device_count"), **pretrain_fit(workdir)}


def run(exp, root: str, stop: StopRequest | None = None) -> dict:
  """Every stage not done yet; -> results (also saved to <root>/results.json after each).
  Raises Preempted (after saving) when a signal stops a stage or arrives between stages."""
  ref = exp.equal_time_reference
  if ref and (ref not in exp.methods or ref == "slm_is"):
    raise config_lib.ConfigError(
        f"exp.equal_time_reference={ref!r}: the method whose pretraining time defines the "
        f"equal-time budget, one of {sorted(set(exp.methods) - {'slm_is'})}, or '' (no "
        "equal-time view)")
  results = {"pretrain": {}, "specialize": {}, "exp": exp.to_dict()}
  path = os.path.join(root, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    check_reusable(saved.get("exp", {}), exp)
    results.update({k: v for k, v in saved.items() if k != "exp"})
  os.makedirs(root, exist_ok=True)

  def save():  # atomically: a kill mid-write must not lose the finished stages
    corpus_lib.write_json(path, results)

  try:
    _run_stages(exp, root, results, save, stop)
  except Preempted:
    save()
    raise
  return results


def domain_train_tokens(corpus: str, tokenizer: str, domains) -> dict[str, int]:
  """Training tokens of each domain split, as the pipeline tokenizes them (documents + eos)."""
  tok = tok_lib.load_tokenizer(tokenizer)
  return {d: sum(map(len, packing.tokenize_docs(tok, corpus_lib.load_texts(corpus, "train", d))))
          for d in domains}


def method_spec(exp, name: str) -> tuple[str, str, str]:
  """-> (config file, pretraining overrides, fine-tuning overrides) of a method."""
  spec, overrides, *finetune = exp.methods[name]
  return spec, overrides, (finetune[0] if finetune else "")


def pretraining_groups(methods) -> list[list[str]]:
  """Methods (a config's or a saved results.json's) grouped by config file and pretraining
  overrides, in their order: each group shares one pretraining run (e.g. one PN specialized
  with two expert-selection rules)."""
  groups = {}
  for name, (spec, overrides, *_) in methods.items():
    groups.setdefault((spec, overrides), []).append(name)
  return list(groups.values())


def pretraining_owners(exp) -> dict[str, str]:
  """{method: the method whose pretraining run it uses}: the first of its group."""
  return {name: group[0] for group in pretraining_groups(exp.methods) for name in group}


def shared_data(exp, root: str) -> tuple[str, str]:
  """-> (corpus, tokenizer): this root's, or with `exp.data_root` another experiment's (the
  parts of one comparison run concurrently on one machine and share one data preparation)."""
  data_root = exp.get("data_root", "")
  if not data_root:
    corpus = build_corpus(exp, root)
    return corpus, shared_tokenizer(exp, corpus, root)
  corpus, tokenizer = os.path.join(data_root, "corpus"), os.path.join(data_root, "tokenizer.model")
  if not os.path.isfile(tokenizer):
    raise config_lib.ConfigError(f"data_root={data_root!r} holds no tokenizer.model yet: run "
                                 "that experiment first (it prepares the shared data)")
  return corpus, tokenizer


def _run_stages(exp, root, results, save, stop) -> None:
  corpus, tokenizer = shared_data(exp, root)
  # A (domain, budget) cell runs only if the domain holds `budget` training tokens: with fewer,
  # "1M tokens" would silently mean the whole, smaller split (the paper's 8M and 64M columns
  # use only the domains that have them).
  counted = results.setdefault("domain_train_tokens", {})
  counted.update(domain_train_tokens(corpus, tokenizer, [d for d in exp.domains
                                                         if d not in counted]))
  owners = pretraining_owners(exp)
  pre_dir = lambda name: os.path.join(root, "pretrain", owners[name])
  for name in exp.methods:
    if name == "slm_is" or name in results["pretrain"]:
      continue  # SLM-is: per domain, below
    if owners[name] != name:
      results["pretrain"][name] = results["pretrain"][owners[name]]
      continue
    spec, overrides, _ = method_spec(exp, name)
    c = pretrain_config(exp, spec, overrides, corpus, tokenizer, root)
    out, secs = _stage(stop, modes.MODES["pretrain"], c, pre_dir(name))
    results["pretrain"][name] = _pretrain_record(exp, c, out, secs, pre_dir(name))
    save()
  results["equal_time"] = (equal_time_choice(exp, results, root)
                           if exp.equal_time_reference else {})
  save()
  eq_time = results["equal_time"].get("methods", {})
  cells = [(d, b) for d in exp.domains for b in exp.budgets if counted[d] >= b]
  # The LLM first (SLM-d's teacher), then the config's order; SLM-is pretrains per cell below.
  order = sorted((m for m in exp.methods if m != "slm_is"), key=lambda m: m != "llm")
  # Equal tokens first, every cell; then the equal-time cells (a stopped run has the main view).
  for domain, budget in cells:
    _equal_tokens_cell(exp, stop, results, save, root, corpus, tokenizer, pre_dir, order,
                       domain, budget)
  for domain, budget in cells:
    _equal_time_cell(exp, stop, results, save, root, pre_dir, order, eq_time, domain, budget)


def _spec_dir(root, name, cell_dir, step=0):
  """Where method `name` is fine-tuned for one cell (from pretraining step `step`: equal time)."""
  return os.path.join(root, "specialize", name + (f"@{step}" if step else ""), cell_dir)


def _equal_tokens_cell(exp, stop, results, save, root, corpus, tokenizer, pre_dir, order,
                       domain, budget) -> None:
  """Every method fine-tuned on one (domain, budget) from its final pretraining checkpoint."""
  cell, cell_dir = f"{domain}/{budget}", f"{domain}-{budget}"
  res = results["specialize"].setdefault(cell, {})
  for name in order:
    if name not in res:
      res[name] = specialize(exp, stop, pre_dir(name), _spec_dir(root, name, cell_dir), domain,
                             budget, overrides=method_spec(exp, name)[2])
      save()
  if exp.distill and "slm_d" not in res:
    res["slm_d"] = specialize(exp, stop, pre_dir("slm"), _spec_dir(root, "slm_d", cell_dir),
                              domain, budget, teacher=_spec_dir(root, "llm", cell_dir))
    save()
  if "slm_is" in exp.methods and "slm_is" not in res:
    res["slm_is"] = _importance_cell(exp, stop, results, save, root, corpus, tokenizer,
                                     domain, budget, _spec_dir(root, "slm_is", cell_dir))
    save()


def _equal_time_cell(exp, stop, results, save, root, pre_dir, order, eq_time, domain,
                     budget) -> None:
  """The methods whose equal-time checkpoint is not their final one, fine-tuned from it."""
  cell, cell_dir = f"{domain}/{budget}", f"{domain}-{budget}"
  res_t = results.setdefault("specialize_equal_time", {}).setdefault(cell, {})
  for name in order:
    choice = eq_time.get(name)
    if not choice or choice["final"]:
      continue  # the equal-token cell is the equal-time one
    if res_t.get(name, {}).get("pretrain_step") != choice["step"]:
      res_t[name] = specialize(exp, stop, pre_dir(name),
                               _spec_dir(root, name, cell_dir, choice["step"]), domain, budget,
                               init_step=choice["step"], overrides=method_spec(exp, name)[2])
      save()


def _importance_cell(exp, stop, results, save, root, corpus, tokenizer, domain, budget,
                     workdir) -> dict:
  """SLM-is for one (domain, budget): pretrain on the generic set resampled to the domain's
  cluster histogram, then fine-tune it like every other method."""
  cell, cell_dir = f"{domain}/{budget}", f"{domain}-{budget}"
  spec, overrides, _ = method_spec(exp, "slm_is")
  c = pretrain_config(exp, spec, overrides, corpus, tokenizer, root)
  c.data.update(domain=domain, domain_tokens=int(budget))
  pre_dir = os.path.join(root, "pretrain_is", cell_dir)
  pre_is = results.setdefault("pretrain_is", {})
  if cell not in pre_is:
    out, secs = _stage(stop, modes.MODES["importance"], c, pre_dir)
    _, final = _final_costs(pre_dir, c)
    pre_is[cell] = dict(is_pretrain_flops=pretrain_flops(c), is_pretrain_seconds=secs,
                        is_pretrain_train_seconds=final.get("train_seconds"),
                        is_pretrain_domain_valid_ppl=out["eval_perplexity"],
                        ess_sequences=out["ess_sequences"])
    save()
  out = specialize(exp, stop, pre_dir, workdir, domain, budget)
  out.update(pre_is[cell])
  return out


# Settings the parts of one comparison may differ in (each part's methods are its own).
_PART_KEYS = ("distill", "equal_time_reference", "budgets", "domains", "data_root")


def load_part(exp, root: str) -> dict:
  """Another part's results.json (an experiment root run on this one's data, e.g. the seeds or
  the hypotheses of gpu_small), checked to share this experiment's settings."""
  path = os.path.join(root, "results.json")
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f"--merge: no results.json in {root!r}")
  with open(path) as f:
    part = json.load(f)
  saved = {k: v for k, v in part.get("exp", {}).items() if k not in _PART_KEYS}
  try:
    check_reusable(dict(saved, methods={}), exp)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"--merge={root}: not a part of this comparison: {e}") from e
  return add_pretrain_fit(part, root)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  exp, root = FLAGS.config, FLAGS.root
  # The parts of one comparison share the first part's compilation cache too (the projected
  # models' fine-tuning steps are the SLM's).
  cache = os.path.join(os.path.abspath(exp.get("data_root") or root), "jit_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  t0 = time.perf_counter()
  if FLAGS.report_only:
    if not os.path.isfile(os.path.join(root, "results.json")):
      raise config_lib.ConfigError(f"--report_only: no results.json in --root={root!r}; run the "
                                   "experiment first, or point --root at one that ran")
    with open(os.path.join(root, "results.json")) as f:
      results = json.load(f)
  else:
    stop = StopRequest().install()
    if FLAGS.max_seconds > 0:
      stop.deadline(FLAGS.max_seconds)
    try:
      with workdir_lock.hold(root, "experiment", flag="--root"):  # stages lock their own
        results = run(exp, root, stop)
        results["wall_seconds_this_invocation"] = time.perf_counter() - t0
        corpus_lib.write_json(os.path.join(root, "results.json"), results)
    except Preempted as e:
      logging.warning("%s (finished stages saved in %s)", e, os.path.join(root, "results.json"))
      print(f"experiment stopped: {e}", flush=True)
      sys.exit(e.exit_code)
  add_pretrain_fit(results, root)
  if FLAGS.merge:
    results = merge_results(results, [load_part(exp, part) for part in FLAGS.merge])
  # The command that makes these results (a --report_only rewrite shows the run's command).
  args = [a for a in sys.argv[1:]
          if not a.startswith(("--report_only", "--docs", "--max_seconds"))]
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
  flags.DEFINE_list("merge", [], "Other experiment roots (parts of this comparison run on its "
                    "data, e.g. gpu_small:seeds) whose results join this report.")
  flags.DEFINE_float("max_seconds", 0, "> 0: after this much wall clock, stop as on SIGTERM "
                     "(the running stage checkpoints) and exit 143; rerun to resume. 0: no limit.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  app.run(cli.entry(main), flags_parser=cli.parse_flags)
