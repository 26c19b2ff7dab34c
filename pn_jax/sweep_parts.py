"""A sweep scored by the specialized model: each point is a method of the comparison experiment
(pn_jax.experiment), pretrained, specialized on the experiment's domains and budgets and
evaluated by its stages, because better generic loss need not mean a better specialized model.

A definition adds
  specialize=dict(experiment="configs/experiments/cpu_small.py:tiny",  # corpus, domains,
                  #   budgets, pretraining tokens and fine-tuning: that config's
                  reference=("configs/slm.py:tiny", ""),  # (optional) the SLM every point is
                  #   compared with; default: the experiment's `slm` method
                  time_of="k=4,h=8",  # (optional) also an SLM fitted to that point's device time
                  budgets=(4096,))    # any other key: a setting of the experiment config
The sweep's `config` and `base` + point overrides become the method's (file, "k=v,...").

Layout under the sweep's root: data/ (corpus, tokenizer, data cache, step costs, compilation
cache: prepared once, `--prepare`) and points/<name>/, one experiment root per point and
per reference (`slm`, `slm@<point>`), each reading data/ (`exp.data_root`), the way
launch/gpu_experiment.sh runs the parts of one comparison. A part resumes, locks and fails on
its own, so a scheduler may run them side by side; gather merges their results.json
(experiment_report.merge_results).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys

import ml_collections

from pn_jax import experiment, experiment_report
from pn_jax import step_costs as step_costs_lib
from pn_jax.config import ConfigError, load_config

REFERENCE = "slm"  # the reference part's name and method
_BLOCK = ("experiment", "reference", "time_of")  # every other key: an experiment setting


@dataclasses.dataclass
class Part:
  """One experiment root of the sweep: a point, or a reference SLM."""
  name: str  # the table's name: the point's (`h=8,m=4`), `slm`, `slm@<point>`
  method: str  # its method in the experiment (a name `pretrain_scale=time:` can refer to)
  entry: tuple[str, str]  # (config file, pretraining overrides "k=v,...")
  exp: ml_collections.ConfigDict  # the part's experiment config: this one method
  config: ml_collections.ConfigDict  # its pretraining config as its stage builds it (but a
  #                                     fitted run's steps: those need the step costs)
  reference: bool  # an SLM the points are compared with
  workdir: str  # <root>/points/<name>


def method_name(name: str) -> str:
  """'h=8,m=4' -> 'h_8_m_4': a method name the experiment's overrides can name
  (`pretrain_scale=time:<method>`; a comma would split the override)."""
  return re.sub(r"\W+", "_", name).strip("_") or "base"


def data_root(root: str) -> str:
  return os.path.join(os.path.abspath(root), "data")


def load_block(block, where: str) -> tuple[ml_collections.ConfigDict, tuple[str, str]]:
  """-> (the experiment config a sweep's `specialize` block names, its settings applied, with no
  methods yet, no SLM-d and no milestone view: each part holds one method; the reference SLM's
  (config file, overrides)). ConfigError naming the block's key that is wrong."""
  if not isinstance(block, dict) or "experiment" not in block:
    raise ConfigError(f"{where}: specialize must be a dict naming its experiment, e.g. "
                      "dict(experiment='configs/experiments/cpu_small.py:tiny')")
  try:
    exp = load_config(block["experiment"])
  except ConfigError as e:
    raise ConfigError(f"{where}: specialize.experiment: {e}") from None
  for key, value in block.items():
    if key in _BLOCK:
      continue
    if key not in exp or key in ("methods", "data_root"):
      raise ConfigError(f"{where}: specialize.{key}: not a setting of {block['experiment']!r} "
                        f"(its settings: {sorted(k for k in exp if k != 'methods')}; the block's "
                        f"own keys: {list(_BLOCK)})")
    try:
      if isinstance(exp[key], ml_collections.ConfigDict) and isinstance(value, dict):
        exp[key].update(value)
      else:
        exp[key] = value
    except (TypeError, AttributeError, KeyError) as e:
      raise ConfigError(f"{where}: specialize.{key}={value!r}: {e}") from None
  reference = block.get("reference") or exp.methods.get(REFERENCE)
  if reference is None:
    raise ConfigError(f"{where}: {block['experiment']!r} has no {REFERENCE!r} method: name the "
                      "SLM every point is compared with, specialize.reference=(config file, "
                      "pretraining overrides)")
  if (not isinstance(reference, (tuple, list)) or len(reference) < 2
      or not all(isinstance(x, str) for x in reference[:2])):
    raise ConfigError(f"{where}: specialize.reference={reference!r}: expected (config file[:arg], "
                      "pretraining overrides)")
  with exp.unlocked():
    exp.update(distill=False, equal_time_reference="", data_root="")
    exp.methods = ml_collections.ConfigDict()  # (update would merge, not replace)
  return exp, tuple(reference[:2])


def overrides_text(overrides: dict, where: str) -> str:
  """{'model.h': 8} -> 'model.h=8' (the experiment's override syntax: scalar values only)."""
  bad = {k: v for k, v in overrides.items()
         if not isinstance(v, (int, float, str)) or (isinstance(v, str) and "," in v)}
  if bad:
    raise ConfigError(f"{where}: {bad}: a point scored by its specialized model takes scalar "
                      "values (the experiment's 'key=value,...' overrides)")
  return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in overrides.items())


def plot_x(sweep, where: str = "sweep") -> str:
  """The cost the figure is drawn against: `plot.x`, pretraining device-seconds by default (the
  paper's cost; at equal tokens the points' FLOPs differ by little more than the projection)."""
  x = sweep.get("plot", {}).get("x", "pretrain_seconds")
  if x not in ("pretrain_seconds", "pretrain_flops"):
    raise ConfigError(f"{where}: plot.x={x!r}: the cost a specialized sweep is plotted against, "
                      "pretrain_seconds or pretrain_flops")
  return x


def _entries(sweep, points: list[tuple[str, dict]], reference, where: str) -> dict:
  """{part name: (method, (config file, overrides), is a reference)}: the SLM, the points, then
  the SLM fitted to `time_of`'s training time (pretrain_scale=time:<that point's method>)."""
  out = {REFERENCE: (REFERENCE, reference, True)}
  for name, overrides in points:
    out[name] = (method_name(name),
                 (sweep["config"], overrides_text(overrides, f"sweep point {name}")), False)
  time_of = sweep["specialize"].get("time_of", "")
  if time_of:
    if time_of not in dict(points):
      raise ConfigError(f"{where}: specialize.time_of={time_of!r}: the point whose device time "
                        f"an SLM is fitted to, one of {[n for n, _ in points]}")
    fit = f"pretrain_scale=time:{method_name(time_of)}"
    out[f"{REFERENCE}@{time_of}"] = (f"{REFERENCE}_at_{method_name(time_of)}",
                                     (reference[0], ",".join(filter(None, (reference[1], fit)))),
                                     True)
  methods = [m for m, _, _ in out.values()]
  clash = sorted({m for m in methods if methods.count(m) > 1})
  if clash:
    raise ConfigError(f"{where}: two parts share the method name(s) {clash} (point names with "
                      "their punctuation dropped): rename a point")
  return out


def plan(sweep, points: list[tuple[str, dict]], root: str, where: str) -> list[Part]:
  """The parts of a sweep scored by the specialized model: the reference SLM, every point (name,
  its overrides with the sweep's base), the SLM at `time_of`'s time. Every part's configs are
  built and validated as its stages will build them (experiment.check_experiment), and the
  domains checked against the source, before anything runs."""
  exp, reference = load_block(sweep["specialize"], where)
  plot_x(sweep, where)
  entries = _entries(sweep, points, reference, where)
  # Any part may be fitted to the SLM's time or to the timed point's (their steps timed alone).
  refs = {m: entry for name, (m, entry, _) in entries.items()
          if name == REFERENCE or name == sweep["specialize"].get("time_of")}
  source = copy.deepcopy(exp)
  source.methods = ml_collections.ConfigDict({REFERENCE: reference})
  try:
    experiment.check_experiment(source, devices=False)  # domains: against the source
  except ConfigError as e:
    raise ConfigError(f"{where}: specialize: {e}") from None
  parts = []
  for name, (method, (spec, overrides), is_ref) in entries.items():
    part = copy.deepcopy(exp)
    with part.unlocked():  # (assigned: update would merge the dicts, not replace them)
      part.data_root = data_root(root)
      part.methods = ml_collections.ConfigDict({method: (spec, overrides)})
      part.time_references = ml_collections.ConfigDict(refs)
      part.labels = ml_collections.ConfigDict({method: name})
    try:
      experiment.check_experiment(part, devices=False)  # (the point checks its mesh)
      config = experiment.pretrain_config(part, spec, overrides, "corpus", "tokenizer.model")
    except ConfigError as e:
      raise ConfigError(f"sweep point {name}: {e}") from None
    parts.append(Part(name, method, (spec, overrides), part, config, is_ref,
                      os.path.join(root, "points", name)))
  return parts


def results_of(part: Part) -> dict | None:
  """The part's results.json (checked: a damaged one is refused, never redone), or None."""
  if not os.path.isfile(os.path.join(part.workdir, experiment.RESULTS)):
    return None
  return experiment.read_results(part.workdir)


def cells(part: Part, results: dict) -> list[tuple[str, int]]:
  """The part's (domain, budget) cells: every budget's domains that hold its tokens."""
  return [(d, b) for b in part.exp.budgets
          for d in experiment_report.budget_domains(results, part.exp, b)]


def is_done(part: Part) -> bool:
  """Pretrained and every cell specialized and evaluated (recorded in its results.json)."""
  results = results_of(part)
  return (results is not None and part.method in results["pretrain"]
          and all(part.method in results["specialize"].get(f"{d}/{b}", {})
                  for d, b in cells(part, results)))


def stages_done(part: Part) -> tuple[int, int]:
  """(stages recorded, stages in all) of a running part, for its progress bar: its results.json
  as last written (atomically), unchecked (the bar never stops a sweep)."""
  try:
    with open(os.path.join(part.workdir, experiment.RESULTS), encoding="utf-8") as f:
      results = json.load(f)
  except (OSError, ValueError):
    results = {}
  todo = cells(part, results)
  done = sum(part.method in results.get("specialize", {}).get(f"{d}/{b}", {}) for d, b in todo)
  return done + (part.method in results.get("pretrain", {})), 1 + len(todo)


def cost_configs(parts: list[Part]) -> dict:
  """{name: pretraining config} of every run fitted to another's time and of what it is fitted
  to, one per measurement (pn_jax.step_costs.cost_key)."""
  out = {}
  for part in parts:
    for name, c in experiment.step_cost_configs(part.exp).items():
      out.setdefault(step_costs_lib.cost_key(c), (f"{part.name}/{name}", c))
  return dict(out.values())


def _costs_path(parts: list[Part]) -> str:
  return experiment.step_costs_path(parts[0].exp, parts[0].workdir)


def is_prepared(parts: list[Part]) -> bool:
  """data/ holds the tokenizer (written last of the corpus and tokenizer) and the step costs the
  fitted runs need."""
  if not os.path.isfile(os.path.join(parts[0].exp.data_root, "tokenizer.model")):
    return False
  costs = step_costs_lib.read(_costs_path(parts))
  return all(step_costs_lib.cost_key(c) in costs for c in cost_configs(parts).values())


def prepare(parts: list[Part]) -> None:
  """The data every part reads, once (before the points run, alone on the device): the corpus
  subset and tokenizer (experiment.shared_data) and, for runs fitted to another's time, each
  step timed alone (pn_jax.step_costs, as launch/step_costs.py)."""
  from pn_jax import workdir_lock
  data = parts[0].exp.data_root
  source = copy.deepcopy(parts[0].exp)
  source.data_root = ""  # this root prepares it
  with workdir_lock.hold(data, "sweep prepare", flag="--root"):
    experiment.shared_data(source, data)
    configs = cost_configs(parts)
    if configs:
      step_costs_lib.measure(configs, _costs_path(parts))


def run(part: Part) -> int:
  """Runs one part to its end (the experiment driver's stages, resumed where they stopped).
  -> 0, or 128 + signum once a signal stopped it at a resumable point."""
  experiment.use_compilation_cache(part.exp, part.workdir)
  try:
    experiment.invoke(part.exp, part.workdir)
  except experiment.Preempted as e:
    print(f"sweep point {part.name} stopped: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  return 0


def merged(parts: list[Part]) -> dict | None:
  """The results of every part that ran, merged as the parts of one comparison (each checked to
  share the first's settings: a point made with another experiment is refused); None if none
  ran."""
  found = [p for p in parts if results_of(p) is not None]
  if not found:
    return None
  loaded = []
  for p in found:
    try:
      loaded.append(experiment.load_part(p.exp, p.workdir))
    except ConfigError as e:
      raise ConfigError(f"sweep point {p.name} ({p.workdir}): {e}") from None
  return experiment_report.merge_results(loaded[0], loaded[1:])
