"""The comparison experiment: pretrain every method, specialize each on each domain and budget,
write docs/results.md and docs/results_ppl_vs_cost.png (pn_jax/experiment_report.py).

    python -m pn_jax.experiment --config=configs/experiments/cpu_small.py --root=runs/exp

Every stage is an ordinary run under --root (pretrain/<method>, specialize/<method>/<domain>-<n>,
specialize/<method>@<step>/... for the equal-time view) made with the same mode functions as
the CLI, so any cell of the table can be re-run or inspected alone (from inside the root: the
stages run there and their configs hold paths relative to it, so a moved root resumes). Every
method's configs are validated before the first stage. Finished stages are skipped on a rerun
(a pretraining run resumes from its checkpoint; a specialization is done when its
specialize.json exists). A signal (or --max_seconds) stops the experiment at a stage boundary
or through the running stage's own checkpoint-and-stop, with exit code 128 + signum; the same
command resumes it. Each stage logs one line as it starts (`[3/14] specialize pn on legal at 1M
tokens`) and shows its training bar.

Two views of the comparison (the paper compares methods at equal pretraining GPU hours):
equal tokens (every method from its final checkpoint) and equal device time (every method
from its latest pretraining milestone within the reference method's training seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from pn_jax import config_overrides
from pn_jax import cli, experiment_figures, experiment_report, modes, workdir_lock
from pn_jax import step_costs as step_costs_lib
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import packing
from pn_jax.data import tokenizer as tok_lib
from pn_jax.experiment_report import finetune_lr, merge_results
from pn_jax.model.model_config import ModelConfig
from pn_jax.specialize import structured_pruning as prune_lib
from pn_jax.train import costs as costs_lib
from pn_jax.train import flops as flops_lib
from pn_jax.train import metrics as metrics_lib
from pn_jax.train import resume_check
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.preflight import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/pn.py:tiny' (relative to the repo) -> that file's get_config('tiny')."""
  return config_lib.load_config(os.path.join(REPO, spec))


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
  for domain in exp.domains:  # a typo is not a missing `prepare`
    corpus_lib.check_domain(src, domain, "exp.domains")
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


def token_count(n: int) -> str:
  """1000000 -> '1M', 250000 -> '250k' (a budget in a progress line)."""
  for unit, size in (("M", 10**6), ("k", 10**3)):
    if n >= size:
      return f"{n / size:.3g}{unit}"
  return str(n)


class Progress:
  """The experiment's progress: one line per stage as it starts, `[3/14] specialize pn on legal
  at 1M tokens`. Stages finished by an earlier invocation are counted, not shown; the
  equal-time stages join the total once pretraining has chosen their checkpoints."""

  def __init__(self, total: int = 0):
    self.total, self.seen = total, 0

  def add(self, n: int) -> None:
    self.total += n

  def skip(self) -> None:
    self.seen += 1

  def start(self, what: str) -> None:
    self.seen += 1
    logging.info("[%d/%d] %s", self.seen, self.total, what)


@dataclasses.dataclass
class Stages:
  """How this invocation runs its stages: from `root`, the directory their configs' relative
  paths resolve against (stage_path); stopped by `stop`; `old_root`: where the root was when its
  results.json was last saved (a moved root: its stages' saved absolute paths are re-rooted);
  `allow_change`: --allow_config_change, passed to a stage that resumes with another config."""
  root: str  # absolute: stages change the working directory
  stop: StopRequest | None = None
  old_root: str = ""
  allow_change: bool = False
  progress: Progress = dataclasses.field(default_factory=Progress)  # the stage lines


def stage_path(root: str, path: str) -> str:
  """`path` as a stage's config holds it: relative to the experiment root when inside it (stages
  run from the root, so the runs of a moved root still find each other), else absolute."""
  path, top = os.path.abspath(path), os.path.abspath(root)
  return os.path.relpath(path, top) if path == top or path.startswith(top + os.sep) else path


@contextlib.contextmanager
def _inside(root: str):
  """The working directory of a running stage: the root (see stage_path)."""
  back = os.getcwd()
  os.chdir(root)
  try:
    yield
  finally:
    os.chdir(back)


def _stage(stages: Stages, mode: str, config, workdir) -> tuple[dict, float]:
  """Runs one stage (the mode `mode`, on `workdir` under the root) -> (result, wall seconds);
  raises Preempted instead of returning a result that a signal cut short."""
  stop, wd = stages.stop, stage_path(stages.root, workdir)
  if stop:
    stop.check()
    stop.in_stage = True
  t0 = time.perf_counter()
  try:
    with _inside(stages.root):
      allow = _resume_allowance(stages, mode, config, wd)
      allow = allow and mode in modes.TRAINING_MODES  # (prune: nothing to resume)
      result = modes.MODES[mode](config, wd, **({"allow_config_change": True} if allow else {}))
  finally:
    if stop:
      stop.in_stage = False
  reason = str(result.get("stop_reason", ""))
  if reason.startswith("SIG"):
    raise Preempted(signal.Signals[reason].value)
  return result, time.perf_counter() - t0


# Config keys holding a path: a resuming stage's saved value and its current one are the same
# place when they are the same path under the root's old and new locations.
_PATH_KEYS = ("data.corpus", "data.tokenizer_path", "data.cache_dir", "init_from",
              "distill.teacher")


def _same_place(saved, now, old_root: str, root: str) -> bool:
  def where(path, top):  # -> relative to `top` if under it (a relative path: from the root)
    path = os.path.normpath(os.path.join(top, path))
    return os.path.relpath(path, top) if path.startswith(top + os.sep) else path
  if not (isinstance(saved, str) and isinstance(now, str) and saved and now):
    return False
  return where(saved, os.path.abspath(old_root)) == where(now, os.path.abspath(root))


def _resume_allowance(stages: Stages, mode: str, config, workdir: str) -> bool:
  """Before a stage resumes from its checkpoint (run from the root): its saved config against the
  one the mode runs. Paths naming the same place under the root's old location are no change
  (the root moved, or was made when stages stored absolute paths); any other change is refused
  in the driver's own terms unless --allow_config_change. -> whether the mode must be told to
  accept the differences (it then logs them)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    saved = None if step is None else resume_check.saved_config(ckpt, step)
  finally:
    ckpt.close()
  if saved is None:
    return False
  # The config the mode compares: a specialization's is completed from its source run.
  final = (modes.specialize.open_specialize_run(config, workdir).config
           if mode == "specialize" else config)
  diff = resume_check.changes(saved, resume_check.as_json(final))
  moved = [k for k in _PATH_KEYS
           if k in diff and _same_place(*diff[k], stages.old_root or stages.root, stages.root)]
  new = resume_check.added_since(diff)
  left = [k for k in diff if not resume_check.is_run_control(k) and k not in new + moved]
  if moved:
    logging.info("%s: resuming from step %d with its paths re-rooted in %s (%s)", workdir, step,
                 os.path.abspath(stages.root), ", ".join(moved))
  if not left:
    return bool(moved)
  _check_shapes(stages, workdir, step, saved, final, diff, left)
  if stages.allow_change:
    return True
  raise config_lib.ConfigError(
      f"stage {workdir} (under --root {stages.root}) would resume from its checkpoint step "
      f"{step} with a config that differs from the one it was trained with: "
      f"{_listing(diff, left)}; restore those settings (configs/*.py), rerun with "
      "--allow_config_change to resume it with the new ones, or move "
      f"{os.path.join(stages.root, workdir)} aside to redo that stage")


def _listing(diff: dict, keys: list[str]) -> str:
  return "; ".join(f"{k}: {json.dumps(diff[k][0])} -> {json.dumps(diff[k][1])}"
                   for k in keys[:10])


def _check_shapes(stages: Stages, workdir: str, step: int, saved: dict, final, diff: dict,
                  keys: list[str]) -> None:
  """CheckpointError (in the driver's terms) if `keys` change the train state's shapes: such a
  checkpoint cannot be resumed at all, --allow_config_change or not."""
  culprits, _ = resume_check.shape_changing(saved, resume_check.as_json(final), keys)
  if culprits:
    raise CheckpointError(
        f"stage {workdir} (under --root {stages.root}): its checkpoint step {step} holds "
        f"parameters of another shape ({_listing(diff, culprits)}); --allow_config_change does "
        f"not apply: revert {', '.join(culprits)}, or move {os.path.join(stages.root, workdir)} "
        "aside to redo that stage")


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
  experiment's generic tokens (`time:<method>`: for that method's training time, at the step
  costs measured by launch/step_costs.py); warmup and milestones follow its length."""
  c = load_run_config(spec)
  c.seed = exp.seed
  c.model.update(vocab_size=exp.vocab_size, max_len=max(c.model.max_len, exp.seq_len))
  c.data.update(corpus=corpus, tokenizer_path=tokenizer, seq_len=exp.seq_len,
                batch_size=exp.batch_size, eval_batches=exp.eval_batches)
  c.optim.lr = exp.pretrain_lr
  items = dict(config_overrides.parse(overrides))  # a repeated key: its last value
  # `pretrain_scale=<f>` (the experiment's, not a run config key): f x the generic tokens;
  # `pretrain_scale=time:<method>`: as many steps as fit in that method's training time.
  scale = str(items.pop("pretrain_scale", 1.0))
  fitted_to = scale.partition("time:")[2]
  tokens = exp.pretrain_tokens * (1.0 if fitted_to else float(scale))
  c.train.steps = max(int(tokens // (exp.batch_size * exp.seq_len)), 1)
  config_overrides.apply(c, items.items())
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  if fitted_to:
    c.train.steps = _time_fitted_steps(exp, c, fitted_to, corpus, tokenizer, root)
  steps = c.train.steps
  if "optim.warmup_steps" not in items:
    c.optim.warmup_steps = max(steps // 20, 1)
  # Checkpoint and eval at every milestone (the equal-time view specializes from them) and keep
  # them all, plus room for 8 extra saves (preemptions, wall-clock saves) before the oldest goes.
  every, _ = milestone_steps(steps, exp.milestones)
  saves = steps // every + (steps % every != 0)
  c.train.update(eval_every=every, checkpoint_every=every,
                 keep_checkpoints=max(c.train.keep_checkpoints, saves + 8), log_every=25,
                 async_checkpoint=False)
  if root:
    c.data.cache_dir = stage_path(root, os.path.join(exp.get("data_root") or root, "data_cache"))
  return c


def time_fitted_to(exp, name: str) -> str:
  """The method whose training time `name`'s run is fitted to (`pretrain_scale=time:<it>`),
  or ''."""
  _, overrides, _ = method_spec(exp, name)
  scale = dict(config_overrides.parse(overrides)).get("pretrain_scale", "")
  return str(scale).partition("time:")[2]


def step_costs_path(exp, root: str) -> str:
  """Where the step costs of a comparison are (launch/step_costs.py writes them): exp.step_costs,
  else step_costs.json in the root that prepares the data (exp.data_root, else this root)."""
  return exp.get("step_costs") or os.path.join(exp.get("data_root") or root, "step_costs.json")


def _time_fitted_steps(exp, c, ref: str, corpus, tokenizer, root) -> int:
  """The steps of a run fitted to method `ref`'s training time, from the measured step costs
  of both (pn_jax.step_costs). Without a root (check_experiment builds configs before any
  stage, and launch/step_costs.py measures them) the steps stay as they are: a step's cost
  does not depend on the run's length."""
  others = exp.get("time_references") or {}
  if (ref not in exp.methods and ref not in others) or (ref in exp.methods
                                                       and time_fitted_to(exp, ref)):
    raise config_lib.ConfigError(
        f"pretrain_scale=time:{ref}: the method whose training time a run is fitted to, one of "
        f"the experiment's methods not fitted itself or of exp.time_references: "
        f"{sorted(set(exp.methods) | set(others))}")
  if not root:
    return c.train.steps
  spec, overrides, *_ = exp.methods[ref] if ref in exp.methods else others[ref]
  ref_c = pretrain_config(exp, spec, overrides, corpus, tokenizer)
  path = step_costs_path(exp, root)
  steps, _ = step_costs_lib.fitted_steps(c, ref_c, step_costs_lib.read(path), path,
                                         f"a {c.name!r} run", ref, step_costs_lib.this_device())
  return steps


def step_cost_configs(exp) -> dict:
  """{method: pretraining config} of each run fitted to another's time (its pretraining run:
  one per group) and of each run it is fitted to: the configs launch/step_costs.py times
  (their lengths aside: a step's cost does not depend on them)."""
  owners = pretraining_owners(exp)
  refs = exp.get("time_references") or {}
  out = {}
  for name in exp.methods:
    ref = time_fitted_to(exp, name)
    if not ref or owners[name] != name:
      continue
    for n, (spec, overrides, *_) in ((name, exp.methods[name]),
                                     (ref, exp.methods[ref] if ref in exp.methods
                                      else refs[ref])):
      out.setdefault(n, pretrain_config(exp, spec, overrides, "corpus", "tokenizer.model"))
  return out


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
                 early_stop_patience=f.early_stop_patience, async_checkpoint=False,
                 log_every=10)
  c.data.update(domain=domain, domain_tokens=int(budget), batch_size=exp.batch_size,
                eval_batches=f.eval_batches)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  config_overrides.apply(c, overrides)
  return c


def specialize(exp, stages, init_from, workdir, domain, budget, teacher="", init_step=0,
               overrides="") -> dict:
  """One fine-tuning cell; done when its specialize.json exists (a preempted one has only
  checkpoints, and the mode resumes from them)."""
  result = _stage_record(os.path.join(workdir, "specialize.json"))
  if result is None:
    name = os.path.basename(os.path.dirname(workdir))  # specialize/<name>/<cell>
    stages.progress.start(
        f"specialize {name} on {domain} at {token_count(int(budget))} tokens"
        + (f" (distilled from {os.path.basename(os.path.dirname(teacher))})" if teacher else "")
        + (" (equal time)" if init_step else ""))
    rel = lambda path: stage_path(stages.root, path) if path else ""
    c = finetune_config(exp, rel(init_from), domain, budget, rel(teacher), init_step, overrides)
    result, _ = _stage(stages, "specialize", c, workdir)
  else:
    stages.progress.skip()
  if "hit_step_cap" not in result:  # specialize.json written before the mode recorded it
    result["hit_step_cap"] = (int(result["steps"]) >= exp.finetune.steps
                              and result.get("stop_reason") != "early_stopping")
  result["pretrain_step"] = int(init_step) or None  # None: the final checkpoint
  return result


def prune_config(exp, init_from: str) -> ml_collections.ConfigDict:
  """The prune stage's config: init_from's model cut to the 'slm' method's widths, calibrated
  on the experiment's batch size."""
  c = load_run_config("configs/prune.py")
  slm = pretrain_config(exp, *method_spec(exp, "slm")[:2], "corpus", "tokenizer.model").model
  c.seed = exp.seed
  c.init_from = init_from
  c.prune.update(d_model=slm.d_model, mlp_dim=slm.mlp_dim)
  c.data.update(batch_size=exp.batch_size, eval_batches=exp.eval_batches)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def _pruned_record(source: dict, out: dict, source_name: str) -> dict:
  """A pruned method's pretraining record: its source's cost plus the pruning's."""
  train = source.get("train_seconds")
  return {"flops": source["flops"] + out["flops"], "seconds": source["seconds"] + out["seconds"],
          "generic_valid_ppl": out["generic_valid_ppl"], "steps": source["steps"],
          "tokens": source["tokens"],
          "train_seconds": None if train is None else train + out["seconds"],
          "device": out["device"], "device_count": source.get("device_count"),
          "pruned_from": source_name, "prune_seconds": out["seconds"],
          "prune_flops": out["flops"], "shape": out["shape"],
          "calibration_loss": out["calibration_loss"]}


def _prune_stages(exp, root, results, save, stages, pre_dir) -> None:
  """SLM-prune: each exp.prune method from its source's final checkpoint, once."""
  for name, source in experiment_report.pruned_methods(exp).items():
    if name in results["pretrain"]:
      stages.progress.skip()
      continue
    c = prune_config(exp, stage_path(root, pre_dir(source)))
    stages.progress.start(f"prune {source} into {name} (d_model {c.prune.d_model}, MLP "
                          f"{c.prune.mlp_dim})")
    out, _ = _stage(stages, "prune", c, _prune_dir(root, name))
    results["pretrain"][name] = _pruned_record(results["pretrain"][source], out, source)
    save()


def _prune_dir(root: str, name: str) -> str:
  return os.path.join(root, "prune", name)


def pruned_equal_time(exp, results) -> None:
  """A pruned method joins the equal-time view when its source does with its final checkpoint
  (a run fitted to the reference's time, or the reference): at the source's cost plus the
  pruning's."""
  methods = results["equal_time"].get("methods", {})
  for name, source in experiment_report.pruned_methods(exp).items():
    choice = methods.get(source)
    if choice and choice["final"]:
      record = results["pretrain"][name]
      methods[name] = {**choice, "seconds": choice["seconds"] + record["prune_seconds"],
                       "flops": choice["flops"] + record["prune_flops"],
                       "generic_valid_ppl": record["generic_valid_ppl"], "pruned_from": source}


def _stage_record(path: str) -> dict | None:
  """A finished stage's record (specialize.json), or None when there is none. One that cannot
  be read or lacks what the report reads (torn by a copy, a full disk) is moved aside to
  `<name>.damaged[.N]` and the stage counts as not done: the mode rebuilds it from the stage's
  checkpoints."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    problem = experiment_report.record_problem(record, experiment_report.CELL_FIELDS)
  except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
    problem = f"cannot be read ({type(e).__name__}: {e})"
  if not problem:
    return record
  aside, n = path + ".damaged", 0
  while os.path.exists(aside):
    n += 1
    aside = f"{path}.damaged.{n}"
  os.replace(path, aside)
  logging.warning("%s %s: moved it to %s; redoing that stage from its checkpoints", path,
                  problem, aside)
  return None


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
  # A run fitted to the reference's time (pretrain_scale=time:...) is compared whole: its
  # length was chosen from step costs timed alone, and its own seconds may be a neighbour's
  # share of the GPU more or less (pn_jax/step_costs.py).
  fitted = {n for n in chosen if n in exp.methods and time_fitted_to(exp, n)}
  chosen.update({n: results["pretrain"][n]["steps"] for n in fitted})
  ref = per_method[exp.equal_time_reference]
  budget = ref[max(ref)]
  out = {"reference": exp.equal_time_reference, "budget_seconds": budget, "methods": {}}
  for name, step in chosen.items():
    at = info[name][step]
    out["methods"][name] = {
        "step": step, "final": step == results["pretrain"][name]["steps"],
        "seconds": float(at["train_seconds"]), "flops": float(at["flops"]),
        "generic_valid_ppl": at.get("eval_perplexity"),
        "over_budget": float(at["train_seconds"]) > budget and name not in fitted,
        "fitted": name in fitted}
  return out


# Settings every finished stage depends on: a root's results are reused only if they match.
# (domains, budgets and new methods may be added: they only add stages.)
_REUSE_KEYS = ("source", "seed", "generic_chars", "heldout_chars", "domain_train_chars",
               "vocab_size", "seq_len", "batch_size", "pretrain_tokens", "pretrain_lr",
               "eval_batches", "finetune", "distill", "tokenizer_from", "milestones",
               "equal_time_reference")


def check_experiment(exp, devices: bool = True) -> None:
  """Every method's run configs (config file and argument, overrides) built and validated as
  its stages will build them, and the cells' domains and budgets checked, before any stage
  runs: a typo in the last method must not surface after the first ones have trained.
  ConfigError naming the method and the key. `devices`: each mesh against this process's
  devices too (starts jax's backend: a sweep's driver leaves that to its points' processes)."""
  ref = exp.equal_time_reference
  if ref and (ref not in exp.methods or ref == "slm_is"):
    raise config_lib.ConfigError(
        f"exp.equal_time_reference={ref!r}: the method whose pretraining time defines the "
        f"equal-time budget, one of {sorted(set(exp.methods) - {'slm_is'})}, or '' (no "
        "equal-time view)")
  budgets = tuple(exp.budgets)
  if not budgets or not all(type(b) is int and b > 0 for b in budgets):
    raise config_lib.ConfigError(f"exp.budgets={budgets!r}: one or more domain training token "
                                 "counts, positive integers")
  if not exp.domains:
    raise config_lib.ConfigError("exp.domains is empty: name the domains to specialize on")
  source = (os.path.join(exp.data_root, "corpus") if exp.get("data_root")
            else corpus_lib.resolve_root(exp.source, "data_cache"))
  have = corpus_lib.list_domains(source)
  missing = [d for d in exp.domains if d not in have]
  if have and missing:  # (a source without domains/ is reported when the corpus is built)
    raise config_lib.ConfigError(f"exp.domains: {missing} not among the domains of "
                                 f"{source!r}: {have}; fix the name")
  if exp.distill and not {"slm", "llm"} <= set(exp.methods):
    raise config_lib.ConfigError("exp.distill=True: SLM-d distils the fine-tuned 'llm' into the "
                                 "pretrained 'slm'; add both methods, or set distill=False")
  cell = dict(domain=exp.domains[0], budget=budgets[0])
  count = jax.device_count() if devices else None
  _check_pruned(exp, count)
  for name in exp.methods:
    entry = exp.methods[name]
    if (not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3)
        or not all(isinstance(x, str) for x in entry)):
      raise config_lib.ConfigError(
          f"exp.methods.{name}={entry!r}: expected (config file[:arg], pretraining overrides"
          "[, fine-tuning overrides]), e.g. ('configs/pn.py:tiny', 'model.k=4')")
    spec, overrides, finetune = method_spec(exp, name)
    what = "pretraining"
    try:
      c = pretrain_config(exp, spec, overrides, "corpus", "tokenizer.model")
      if name == "slm_is":
        c.data.update(domain=cell["domain"], domain_tokens=cell["budget"])
      config_lib.validate(c, device_count=count)
      what = "fine-tuning"
      c = finetune_config(exp, "pretrain", cell["domain"], cell["budget"], overrides=finetune)
      config_lib.validate(c, device_count=count)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"exp.methods.{name} ({what} config of {spec!r}): {e}") from e
  if exp.distill:
    try:
      c = finetune_config(exp, "pretrain", cell["domain"], cell["budget"], teacher="teacher")
      config_lib.validate(c, device_count=count)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"exp.distill (SLM-d's fine-tuning config): {e}") from e


def _check_pruned(exp, device_count) -> None:
  """exp.prune's entries: new names, dense sources among the methods, and the 'slm' widths a
  source's model can be cut to."""
  for name, source in experiment_report.pruned_methods(exp).items():
    where = f"exp.prune.{name}={source!r}"
    if name in exp.methods or name in ("slm_d", "slm_is"):
      raise config_lib.ConfigError(f"{where}: {name!r} is already a method; name the pruned "
                                   "model anew (e.g. slm_prune)")
    if source not in exp.methods or source == "slm_is" or "slm" not in exp.methods:
      raise config_lib.ConfigError(
          f"{where}: prunes a method's pretrained model to the 'slm' method's widths; it needs "
          f"that method and 'slm' in exp.methods (have {sorted(exp.methods)})")
    try:
      c = prune_config(exp, "pretrain")
      config_lib.validate(c, device_count=device_count)
      src = pretrain_config(exp, *method_spec(exp, source)[:2], "corpus", "tokenizer.model")
      prune_lib.pruned_shape(ModelConfig.from_config(src.model), c.prune.d_model,
                             c.prune.mlp_dim)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{where}: {e}") from e


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


def run(exp, root: str, stop: StopRequest | None = None,
        allow_config_change: bool = False) -> dict:
  """Every stage not done yet; -> results (also saved to <root>/results.json after each).
  Raises Preempted (after saving) when a signal stops a stage or arrives between stages.
  `allow_config_change`: a stage resumes although its config changed (logged)."""
  check_experiment(exp)
  results = {"pretrain": {}, "specialize": {}, "exp": exp.to_dict()}
  path = os.path.join(root, RESULTS)
  saved = read_results(root) if os.path.exists(path) else {}
  if saved:
    check_reusable(saved.get("exp", {}), exp)
    results.update({k: v for k, v in saved.items() if k != "exp"})
  # Where the stages were made: their saved absolute paths under it are re-rooted here.
  stages = Stages(os.path.abspath(root), stop, old_root=saved.get("root", ""),
                  allow_change=allow_config_change)
  if stages.old_root and os.path.abspath(stages.old_root) != os.path.abspath(root):
    logging.info("experiment root moved from %s to %s: resuming its stages here",
                 stages.old_root, os.path.abspath(root))
  results["root"] = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)

  def save():  # atomically: a kill mid-write must not lose the finished stages
    corpus_lib.write_json(path, results)

  try:
    _run_stages(exp, root, results, save, stages)
  except Preempted:
    save()
    raise
  return results


RESULTS = "results.json"


def read_results(root: str, flag: str = "--root") -> dict:
  """<root>/results.json, checked: one that cannot be read, is not an object or holds a record
  the driver or the report cannot read is refused (WorkdirError naming it and the fix), never
  rewritten: it holds the finished stages."""
  path = os.path.join(root, RESULTS)
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
    problem = experiment_report.check_results(results)
  except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
    problem = f"cannot be read ({type(e).__name__}: {e})"
  if problem:
    raise WorkdirError(
        f"{flag} {root}: {path} {problem}; restore it (a copy, or docs/results_data/ for a "
        "published run), or move it aside and rerun the experiment, which then records the "
        "stages again from their runs under the root")
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


def planned_stages(exp, cells) -> int:
  """The stages of the pretraining and equal-token views (the equal-time ones come later)."""
  owners = pretraining_owners(exp)
  pretrains = sum(1 for m in exp.methods if m != "slm_is" and owners[m] == m)
  pruned = len(experiment_report.pruned_methods(exp))
  per_cell = (sum(1 for m in exp.methods if m != "slm_is") + bool(exp.distill) + pruned
              + 2 * ("slm_is" in exp.methods))  # SLM-is: its pretraining, its fine-tuning
  return pretrains + pruned + per_cell * len(cells)


def _run_stages(exp, root, results, save, stages) -> None:
  corpus, tokenizer = shared_data(exp, root)
  # A (domain, budget) cell runs only if the domain holds `budget` training tokens: with fewer,
  # "1M tokens" would silently mean the whole, smaller split (the paper's 8M and 64M columns
  # use only the domains that have them).
  counted = results.setdefault("domain_train_tokens", {})
  counted.update(domain_train_tokens(corpus, tokenizer, [d for d in exp.domains
                                                         if d not in counted]))
  # The smallest budget of every domain first: a run stopped mid-way has whole columns.
  cells = [(d, b) for b in sorted(exp.budgets) for d in exp.domains if counted[d] >= b]
  stages.progress.add(planned_stages(exp, cells))
  owners = pretraining_owners(exp)
  pre_dir = lambda name: os.path.join(root, "pretrain", owners[name])
  for name in exp.methods:
    if name == "slm_is" or name in results["pretrain"]:
      if owners[name] == name != "slm_is":
        stages.progress.skip()  # pretrained by an earlier invocation
      continue  # SLM-is: per domain, below
    if owners[name] != name:
      results["pretrain"][name] = results["pretrain"][owners[name]]
      continue
    spec, overrides, _ = method_spec(exp, name)
    c = pretrain_config(exp, spec, overrides, stage_path(root, corpus),
                        stage_path(root, tokenizer), root)
    stages.progress.start(f"pretrain {name} ({spec}{' ' + overrides if overrides else ''}): "
                          f"{c.train.steps} steps")
    out, secs = _stage(stages, "pretrain", c, pre_dir(name))
    results["pretrain"][name] = _pretrain_record(exp, c, out, secs, pre_dir(name))
    save()
  _prune_stages(exp, root, results, save, stages, pre_dir)
  results["equal_time"] = (equal_time_choice(exp, results, root)
                           if exp.equal_time_reference else {})
  pruned_equal_time(exp, results)
  save()
  eq_time = results["equal_time"].get("methods", {})
  # The LLM first (SLM-d's teacher), then the config's order; SLM-is pretrains per cell below.
  order = sorted((m for m in exp.methods if m != "slm_is"), key=lambda m: m != "llm")
  stages.progress.add(
      len(cells) * sum(1 for m in order if eq_time.get(m) and not eq_time[m]["final"]))
  # Equal tokens first, every cell; then the equal-time cells (a stopped run has the main view).
  for domain, budget in cells:
    _equal_tokens_cell(exp, stages, results, save, root, corpus, tokenizer, pre_dir, order,
                       domain, budget)
  for domain, budget in cells:
    _equal_time_cell(exp, stages, results, save, root, pre_dir, order, eq_time, domain, budget)


def _spec_dir(root, name, cell_dir, step=0):
  """Where method `name` is fine-tuned for one cell (from pretraining step `step`: equal time)."""
  return os.path.join(root, "specialize", name + (f"@{step}" if step else ""), cell_dir)


def _equal_tokens_cell(exp, stages, results, save, root, corpus, tokenizer, pre_dir, order,
                       domain, budget) -> None:
  """Every method fine-tuned on one (domain, budget) from its final pretraining checkpoint."""
  cell, cell_dir = f"{domain}/{budget}", f"{domain}-{budget}"
  res = results["specialize"].setdefault(cell, {})
  for name in order:
    if name not in res:
      res[name] = specialize(exp, stages, pre_dir(name), _spec_dir(root, name, cell_dir), domain,
                             budget, overrides=method_spec(exp, name)[2])
      save()
    else:
      stages.progress.skip()
  if exp.distill and "slm_d" not in res:
    res["slm_d"] = specialize(exp, stages, pre_dir("slm"), _spec_dir(root, "slm_d", cell_dir),
                              domain, budget, teacher=_spec_dir(root, "llm", cell_dir))
    save()
  elif exp.distill:
    stages.progress.skip()
  # SLM-prune: the pruned model fine-tuned like an SLM
  for name in experiment_report.pruned_methods(exp):
    if name not in res:
      res[name] = specialize(exp, stages, _prune_dir(root, name),
                             _spec_dir(root, name, cell_dir), domain, budget)
      save()
    else:
      stages.progress.skip()
  if "slm_is" in exp.methods and "slm_is" not in res:
    res["slm_is"] = _importance_cell(exp, stages, results, save, root, corpus, tokenizer,
                                     domain, budget, _spec_dir(root, "slm_is", cell_dir))
    save()
  elif "slm_is" in exp.methods:
    stages.progress.skip()
    stages.progress.skip()


def _equal_time_cell(exp, stages, results, save, root, pre_dir, order, eq_time, domain,
                     budget) -> None:
  """The methods whose equal-time checkpoint is not their final one, fine-tuned from it."""
  cell, cell_dir = f"{domain}/{budget}", f"{domain}-{budget}"
  res_t = results.setdefault("specialize_equal_time", {}).setdefault(cell, {})
  for name in order:
    choice = eq_time.get(name)
    if not choice or choice["final"]:
      continue  # the equal-token cell is the equal-time one
    if res_t.get(name, {}).get("pretrain_step") != choice["step"]:
      res_t[name] = specialize(exp, stages, pre_dir(name),
                               _spec_dir(root, name, cell_dir, choice["step"]), domain, budget,
                               init_step=choice["step"], overrides=method_spec(exp, name)[2])
      save()
    else:
      stages.progress.skip()


def _importance_cell(exp, stages, results, save, root, corpus, tokenizer, domain, budget,
                     workdir) -> dict:
  """SLM-is for one (domain, budget): pretrain on the generic set resampled to the domain's
  cluster histogram, then fine-tune it like every other method."""
  cell, cell_dir = f"{domain}/{budget}", f"{domain}-{budget}"
  spec, overrides, _ = method_spec(exp, "slm_is")
  c = pretrain_config(exp, spec, overrides, stage_path(root, corpus),
                      stage_path(root, tokenizer), root)
  c.data.update(domain=domain, domain_tokens=int(budget))
  pre_dir = os.path.join(root, "pretrain_is", cell_dir)
  pre_is = results.setdefault("pretrain_is", {})
  if cell not in pre_is:
    stages.progress.start(f"pretrain slm_is for {domain} at {token_count(int(budget))} tokens "
                          f"(importance sampling): {c.train.steps} steps")
    out, secs = _stage(stages, "importance", c, pre_dir)
    _, final = _final_costs(pre_dir, c)
    pre_is[cell] = dict(is_pretrain_flops=pretrain_flops(c), is_pretrain_seconds=secs,
                        is_pretrain_train_seconds=final.get("train_seconds"),
                        is_pretrain_domain_valid_ppl=out["eval_perplexity"],
                        ess_sequences=out["ess_sequences"])
    save()
  else:
    stages.progress.skip()
  out = specialize(exp, stages, pre_dir, workdir, domain, budget)
  out.update(pre_is[cell])
  return out


# Settings the parts of one comparison may differ in (each part's methods are its own).
_PART_KEYS = ("distill", "equal_time_reference", "budgets", "domains", "data_root")


def load_part(exp, root: str) -> dict:
  """Another part's results.json (an experiment root run on this one's data, e.g. the seeds or
  the hypotheses of gpu_small), checked to share this experiment's settings."""
  if not os.path.isfile(os.path.join(root, RESULTS)):
    raise config_lib.ConfigError(f"--merge: no results.json in {root!r}")
  part = read_results(root, flag="--merge")
  saved = {k: v for k, v in part.get("exp", {}).items() if k not in _PART_KEYS}
  try:
    check_reusable(dict(saved, methods={}), exp)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"--merge={root}: not a part of this comparison: {e}") from e
  return add_pretrain_fit(part, root)


def use_compilation_cache(exp, root: str) -> None:
  """The parts of one comparison share the first part's compilation cache (the projected models'
  fine-tuning steps are the SLM's): <data_root or root>/jit_cache."""
  cache = os.path.join(os.path.abspath(exp.get("data_root") or root), "jit_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def invoke(exp, root: str, max_seconds: float = 0, allow_config_change: bool = False) -> dict:
  """One invocation of the driver on `root` (this command's, and each point of a sweep scored by
  the specialized model: pn_jax.sweep_parts): checked, signal-stoppable, holding the root's lock;
  -> results, saved. Raises Preempted once a signal or `max_seconds` stopped it."""
  t0 = time.perf_counter()
  check_experiment(exp)  # (run checks again) before the lock creates the root
  stop = StopRequest().install()
  if max_seconds > 0:
    stop.deadline(max_seconds)
  try:
    with workdir_lock.hold(root, "experiment", flag="--root"):  # stages lock their own
      results = run(exp, root, stop, allow_config_change=allow_config_change)
      results["wall_seconds_this_invocation"] = time.perf_counter() - t0
      corpus_lib.write_json(os.path.join(root, RESULTS), results)
  except Preempted as e:
    logging.warning("%s (finished stages saved in %s)", e, os.path.join(root, RESULTS))
    raise
  return results


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  exp, root = FLAGS.config, FLAGS.root
  use_compilation_cache(exp, root)
  t0 = time.perf_counter()
  if FLAGS.report_only:
    if not os.path.isfile(os.path.join(root, "results.json")):
      raise config_lib.ConfigError(f"--report_only: no results.json in --root={root!r}; run the "
                                   "experiment first, or point --root at one that ran")
    results = read_results(root)
  else:
    try:
      results = invoke(exp, root, FLAGS.max_seconds, FLAGS.allow_config_change)
    except Preempted as e:
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


def write_report(results, exp, docs: str, command: str, tag: str = "",
                 figure: str = "results_ppl_vs_cost.png") -> None:
  """The report: its tables in <docs>/results.md (experiment_report) and its figures."""
  experiment_report.write_report(results, exp, docs, command, tag=tag, figure=figure)
  experiment_figures.write_figures(results, exp, docs, figure)


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
  flags.DEFINE_bool("allow_config_change", False, "Resume a stage whose checkpoint was trained "
                    "with another config (e.g. after editing configs/*.py); the changed keys "
                    "are logged. Settings of the experiment config itself are compared with "
                    "<root>/results.json and never allowed to change.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  app.run(cli.entry(main), flags_parser=cli.parse_flags)
