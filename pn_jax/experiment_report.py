"""docs/results.md and the figure from an experiment's results.json (pn_jax/experiment.py runs
it; `python -m pn_jax.experiment ... --report_only` rewrites the report alone).

Two views, each a table of macro-averaged test perplexity and cost, a vs-SLM table and the
per-domain numbers:
- equal tokens: every method specialized from its final pretraining checkpoint;
- equal device time: every method from its latest milestone checkpoint whose training seconds
  fit in the reference method's total (Table 8 of the paper compares at equal GPU hours).
Then, where the config has them, the seed groups (the same methods with another model seed) and
the "what mattered" table (PN variants, one change each, against their SLM). A comparison run as
several parts (experiment roots) is reported from `merge_results` of their results.
Cells whose fine-tuning ran into the step cap (not converged) carry a `*`.
"""

from __future__ import annotations

import copy
import math
import os

import ml_collections
import numpy as np

VIEWS = {"tokens": "equal pretraining tokens (every method's final checkpoint)",
         "time": "equal pretraining device time"}
CAP = "*"  # a cell with a fine-tuning run that hit the step cap
OVER = "†"  # equal time: even the method's first milestone cost more than the reference
# Table names; a method a config adds without one here prints as its key.
LABELS = {"slm": "SLM", "mix": "SLM-mix", "pn": "PN", "llm": "LLM", "slm_d": "SLM-d",
          "slm_is": "SLM-is", "pn_lrs": "PN, T lr/sqrt(h)",
          # the LLM pruned to the SLM's widths and repaired by least squares (mode prune)
          "slm_prune": "SLM-prune",
          "pn_homogeneous": "PN, one cluster per batch",
          # DEMix (Gururangan et al., 2022): per-cluster MLPs, shared attention (the name
          # readers know for configs/mix_shared.py)
          "mix_shared": "DEMix (shared attention)"}


# What the driver and the report read from each record, a number each: a results.json (or a
# stage's specialize.json) whose records lack one is refused when it is read, not half-way
# through writing the report.
PRETRAIN_FIELDS = ("flops", "seconds")
CELL_FIELDS = ("test_ppl", "noft_test_ppl", "specialize_flops", "fit_seconds", "steps")
EQUAL_TIME_FIELDS = ("step", "seconds", "flops")
_SECTIONS = ("pretrain", "pretrain_is", "specialize", "specialize_equal_time", "equal_time",
             "domain_train_tokens", "exp")


def record_problem(record, fields) -> str:
  """'' if `record` is an object holding a number at each of `fields`, else what is wrong."""
  if not isinstance(record, dict):
    return f"is {_short(record)}, not an object"
  for f in fields:
    value = record.get(f)
    if value is None and f in record:  # strict JSON's null: a non-finite number (a diverged run)
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f"has {f}={_short(value)}, not a number" if f in record else f"lacks {f}"
  return ""


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def check_results(results) -> str:
  """'' if `results` (a parsed results.json) has the shape the driver and the report read, else
  what is wrong with it, naming the first bad entry. A record's number written as null (strict
  JSON for a non-finite value) is read back as NaN, in place."""
  if not isinstance(results, dict):
    return f"holds {_short(results)}, not a results object"
  if not results:
    return "holds an empty object"
  for section in _SECTIONS:
    if section in results and not isinstance(results[section], dict):
      return f"has {section}={_short(results[section])}, not an object"
  checks = [(f"pretrain[{m!r}]", r, PRETRAIN_FIELDS)
            for m, r in results.get("pretrain", {}).items()]
  checks += [(f"pretrain_is[{c!r}]", r, ()) for c, r in results.get("pretrain_is", {}).items()]
  for view in ("specialize", "specialize_equal_time"):
    for cell, methods in results.get(view, {}).items():
      if not isinstance(methods, dict):
        return f"has {view}[{cell!r}]={_short(methods)}, not an object"
      checks += [(f"{view}[{cell!r}][{m!r}]", r, CELL_FIELDS) for m, r in methods.items()]
  timed = results.get("equal_time", {})
  if timed:
    if not isinstance(timed.get("methods"), dict):
      return f"has equal_time.methods={_short(timed.get('methods'))}, not an object"
    checks += [(f"equal_time.methods[{m!r}]", r, EQUAL_TIME_FIELDS)
               for m, r in timed["methods"].items()]
  for where, record, fields in checks:
    problem = record_problem(record, fields)
    if problem:
      return f"has a malformed record: {where} {problem}"
    for f in fields:  # back to the NaN that results.json wrote as null (corpus.strict_json)
      if record.get(f, 0) is None:
        record[f] = math.nan
  tokens = results.get("domain_train_tokens", {})
  bad = [d for d, n in tokens.items() if isinstance(n, bool) or not isinstance(n, int)]
  if bad:
    return f"has domain_train_tokens[{bad[0]!r}]={_short(tokens[bad[0]])}, not an integer"
  return ""


def label(method: str, exp=None) -> str:
  """The table name: the config's (`exp.labels`, for the methods it adds) before the module's."""
  labels = (exp.get("labels") if exp is not None else None) or {}
  return labels.get(method) or LABELS.get(method, method)


def _union(parts: list[dict]) -> dict:
  """The union of dicts, the first one's entries winning."""
  out = {}
  for part in parts:
    for k, v in part.items():
      out.setdefault(k, v)
  return out


def _owners(parts: list[dict]) -> dict:
  """method -> the index of the part whose runs of it are used: the first that pretrained it
  (SLM-d and SLM-is, pretrained per cell or not at all: the first that fine-tuned it)."""
  owner = {}
  for i, p in enumerate(parts):
    for m in p.get("pretrain", {}):
      owner.setdefault(m, i)
  for i, p in enumerate(parts):
    for cell in p.get("specialize", {}).values():
      for m in cell:
        owner.setdefault(m, i)
  return owner


def merge_results(primary: dict, others: list[dict]) -> dict:
  """One results dict from the parts of a comparison (each its own experiment root, run
  concurrently): the union of their stages, the primary's entries winning a clash and its `exp`
  kept. A method run by two parts (a part run again) takes everything from one of them, the first
  that pretrained it: its cells never mix two pretraining runs. A part's equal-time entries were
  chosen against that part's own reference (e.g. the seed-1 PN against the seed-1 SLM): each
  merged entry records it as "reference"."""
  parts = [primary, *others]
  owner = _owners(parts)
  out = dict(primary)
  for key in ("pretrain", "pretrain_is", "domain_train_tokens"):
    out[key] = _union([p.get(key, {}) for p in parts])
  for key in ("specialize", "specialize_equal_time"):
    out[key] = {}
    for i, p in enumerate(parts):
      for cell, methods in p.get(key, {}).items():
        merged = out[key].setdefault(cell, {})
        merged.update({m: r for m, r in methods.items() if owner.get(m, i) == i})
  timed = [(i, p["equal_time"]) for i, p in enumerate(parts) if p.get("equal_time")]
  out["equal_time"] = {**timed[0][1], "methods": {
      m: {"reference": eq["reference"], **entry} for i, eq in timed
      for m, entry in eq["methods"].items() if owner.get(m, i) == i}} if timed else {}
  return copy.deepcopy(out)


def geomean(values) -> float:
  return float(np.exp(np.mean(np.log(values))))


def macro(cells: list[dict], key: str) -> float:
  """exp(mean over domains of the per-token NLL): the paper's macro-averaged perplexity."""
  return geomean([c[key] for c in cells])


def view_cell(results, view: str, cell: str, method: str) -> dict | None:
  """One specialization result of a view; the equal-time view reuses the equal-token cell of a
  method whose affordable checkpoint is its final one."""
  tokens = results["specialize"].get(cell, {}).get(method)
  if view == "tokens":
    return tokens
  choice = results.get("equal_time", {}).get("methods", {}).get(method)
  if not choice:
    return None
  if choice["final"]:
    return tokens
  out = results.get("specialize_equal_time", {}).get(cell, {}).get(method)
  return out if out and out.get("pretrain_step") == choice["step"] else None


def budget_domains(results, exp, budget: int) -> list[str]:
  """The domains whose training split holds `budget` tokens (the paper's 8M/64M columns use only
  the domains that have them); results made before the driver counted them: every domain."""
  tokens = results.get("domain_train_tokens", {})
  return [d for d in exp.domains if tokens.get(d, budget) >= budget]


def available_cells(results, exp, method: str, budget: int, view: str = "tokens"
                    ) -> dict[str, dict]:
  """{domain: specialization result} for the budget's domains the method has a cell for."""
  cells = {d: view_cell(results, view, f"{d}/{budget}", method)
           for d in budget_domains(results, exp, budget)}
  return {d: c for d, c in cells.items() if c is not None}


def method_cells(results, exp, method: str, budget: int, view: str = "tokens"
                 ) -> dict[str, dict] | None:
  """available_cells if the method has every domain of the budget, else None: a macro average
  over fewer domains would not compare with the others'."""
  cells = available_cells(results, exp, method, budget, view)
  return cells if len(cells) == len(budget_domains(results, exp, budget)) else None


def pruned_methods(exp) -> dict[str, str]:
  """exp.prune: {SLM-prune method: the method whose final pretrained model it prunes}, e.g.
  {"slm_prune": "llm"}; each is cut to the 'slm' method's d_model and MLP width (mode prune)."""
  return dict(exp.get("prune") or {})


def main_methods(exp) -> list[str]:
  """The main tables' candidates: the paper's methods, the config's, then the seed groups'
  members (run as another part); a part's hypothesis variants have their own table."""
  known = ["slm", "mix", "pn", "llm", "slm_d", "slm_prune", "slm_is"]
  seeds = [m for members in exp.get("seed_groups", {}).values() for m in members]
  return list(dict.fromkeys([*known, *exp.methods, *seeds]))


def step_cap(results, exp) -> int:
  """The cap the cells were made with (results.json's settings; a --report_only config may
  differ)."""
  return results.get("exp", {}).get("finetune", {}).get("steps", exp.finetune.steps)


def table_rows(results, exp, view: str = "tokens"):
  methods = [m for m in main_methods(exp)
             if all(method_cells(results, exp, m, b, view) is not None for b in exp.budgets)]
  cap = step_cap(results, exp)
  rows = []
  for m in methods:
    row = {"method": m}
    for b in exp.budgets:
      by_domain = method_cells(results, exp, m, b, view)
      domains, cells = list(by_domain), list(by_domain.values())
      row[b] = {"macro": macro(cells, "test_ppl"),
                "per_domain": {d: c["test_ppl"] for d, c in zip(domains, cells)},
                "capped": {d: hit_step_cap(c, cap) for d, c in zip(domains, cells)},
                "noft": macro(cells, "noft_test_ppl"),
                "spec_flops": float(np.mean([c["specialize_flops"] for c in cells])),
                "spec_seconds": float(np.mean([c["fit_seconds"] for c in cells])),
                "steps": float(np.mean([c["steps"] for c in cells]))}
      if m == "slm_is":
        row[b]["is_flops"] = float(np.mean([c["is_pretrain_flops"] for c in cells]))
        row[b]["is_seconds"] = float(np.mean([_is_seconds(c) for c in cells]))
    rows.append(row)
  return rows


def hit_step_cap(cell: dict, cap: int) -> bool:
  """Recorded by the specialize mode; cells made before it recorded it: ran to the cap."""
  if "hit_step_cap" in cell:
    return bool(cell["hit_step_cap"])
  return int(cell["steps"]) >= cap


def rows_by(rows, method):
  for r in rows:
    if r["method"] == method:
      return r
  raise KeyError(method)


def pretrain_seconds(p: dict) -> float:
  """Training seconds from costs.json; runs made before it: the stage's wall seconds."""
  return p["train_seconds"] if p.get("train_seconds") is not None else p["seconds"]


def _is_seconds(c: dict) -> float:
  s = c.get("is_pretrain_train_seconds")
  return s if s is not None else c["is_pretrain_seconds"]


def pretrain_cost(results, m, row, budget, view: str = "tokens"):
  """Pretraining FLOPs and seconds attributable to one domain's model."""
  if view == "time":
    choice = results["equal_time"]["methods"][m]
    return choice["flops"], choice["seconds"]
  if m == "slm_is":
    return row[budget]["is_flops"], row[budget]["is_seconds"]
  if m == "slm_d":  # the student's and the teacher's pretraining
    p, q = results["pretrain"]["slm"], results["pretrain"]["llm"]
    return p["flops"] + q["flops"], pretrain_seconds(p) + pretrain_seconds(q)
  p = results["pretrain"][m]
  return p["flops"], pretrain_seconds(p)


def _generic_ppl(results, m, view) -> str:
  if view == "time":
    ppl = results["equal_time"]["methods"][m]["generic_valid_ppl"]
  else:
    pre = results["pretrain"]
    ppl = (pre[m]["generic_valid_ppl"] if m in pre else
           pre["slm"]["generic_valid_ppl"] if m == "slm_d" else None)
  return "-" if ppl is None else f"{ppl:.2f}"


def _ppl(value: float, capped) -> str:
  return f"{value:.2f}" + (CAP if capped else "")


def cost_table(results, rows, exp, view: str) -> list[str]:
  b_small, b_large = exp.budgets[0], exp.budgets[-1]
  ckpt = ["pretrain step"] if view == "time" else []
  head = (["method", *ckpt, "pretrain FLOPs", "pretrain s", "generic valid ppl", "no ft"]
          + [f"ft {b:.0e}" for b in exp.budgets]
          + ["spec FLOPs (small / large)", "spec s (small / large)"])
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    m = r["method"]
    pf, ps = pretrain_cost(results, m, r, b_large, view)
    step = []
    if view == "time":
      eq = results["equal_time"]
      choice, ref = eq["methods"][m], eq["methods"][m].get("reference", eq["reference"])
      step = [f"{choice['step']}" + (" (final)" if choice["final"] else "")
              + (f" {OVER}" if choice["over_budget"] else "")
              + (f" (vs {label(ref, exp)})" if ref != eq["reference"] else "")]
    sf = [r[b]["spec_flops"] + (rows_by(rows, "llm")[b]["spec_flops"] if m == "slm_d" else 0)
          for b in (b_small, b_large)]
    lines.append(
        f"| {label(m, exp)} | " + "".join(s + " | " for s in step)
        + f"{pf:.2e} | {ps:.3g} | {_generic_ppl(results, m, view)} | {r[b_small]['noft']:.2f} | "
        + " | ".join(_ppl(r[b]["macro"], any(r[b]["capped"].values())) for b in exp.budgets)
        + f" | {sf[0]:.2e} / {sf[1]:.2e} | "
        f"{r[b_small]['spec_seconds']:.0f} / {r[b_large]['spec_seconds']:.0f} |")
  return lines


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
      domains = r[b]["per_domain"]
      better = sum(domains[d] < slm[b]["per_domain"][d] for d in domains)
      cells += [f"{100 * (r[b]['macro'] / slm[b]['macro'] - 1):+.1f}%",
                f"{better}/{len(domains)}"]
    out.append(f"| {label(r['method'], exp)} | " + " | ".join(cells) + " |")
  return out


def per_domain_table(rows, exp) -> list[str]:
  out = ["| method | budget | " + " | ".join(exp.domains) + " |",
         "|---" * (2 + len(exp.domains)) + "|"]
  for r in rows:
    for b in exp.budgets:
      out.append(f"| {label(r['method'], exp)} | {b:.0e} | "
                 + " | ".join(_ppl(r[b]["per_domain"][d], r[b]["capped"][d])
                              if d in r[b]["per_domain"] else "-" for d in exp.domains) + " |")
  return out


def devices(results) -> str:
  """Where the pretraining seconds were measured (costs.json), e.g. 'NVIDIA H200 x1'."""
  seen = sorted({f"{p['device']} x{p.get('device_count') or 1}"
                 for p in results["pretrain"].values() if p.get("device")})
  return ", ".join(seen) or "unknown (runs made before costs.json: stage wall seconds)"


def view_section(results, exp, view: str) -> tuple[list[str], list[dict]]:
  rows = table_rows(results, exp, view)
  if view == "time":
    eq = results.get("equal_time") or {}
    if not eq or not rows:
      return [f"#### {VIEWS[view]}", "",
              "Not available: the reference's pretraining run has no costs.json with every "
              "milestone (runs made before the training loop wrote it).", ""], rows
    ref = label(eq["reference"], exp)
    merged = any(eq["methods"][r["method"]].get("reference", eq["reference"]) != eq["reference"]
                 for r in rows)  # rows from another part, chosen against its own reference
    intro = (f"Each method specialized from its latest pretraining milestone "
             f"({', '.join(f'{f:g}' for f in exp.milestones)} of its steps) whose training "
             f"seconds are within {ref}'s total, {eq['budget_seconds']:.3g} s"
             + (" (\"(vs X)\": within X's, the reference of the part it was run in)"
                if merged else "")
             + ("; a run fitted to the reference's time (`pretrain_scale=time:...`, its steps "
                "from step costs timed alone) is compared at its final step"
                if any(e.get("fitted") for e in eq["methods"].values()) else "")
             + f"; \"(final)\" reuses the equal-token cell. {OVER}: even the first milestone "
             "cost more. SLM-d and SLM-is are compared at equal tokens only (their cost is "
             "the SLM's plus the LLM's, and a per-domain pretraining run).")
  else:
    intro = ("Every method specialized from its final checkpoint (the same generic tokens; "
             "SLM-is: per domain; SLM-d: the SLM's + the LLM's pretraining).")
  lines = [f"#### {VIEWS[view]}", "", intro, "", *cost_table(results, rows, exp, view), "",
           *vs_slm_table(rows, exp), "", *per_domain_table(rows, exp), ""]
  done = [r["method"] for r in rows]
  lines += (partial_time_table(results, exp, done) if view == "time"
            else partial_tokens_table(results, exp, done))
  return lines, rows


def partial_tokens_table(results, exp, complete: list[str]) -> list[str]:
  """The equal-token cells of methods that do not have them all (a run stopped before the
  rest), hypothesis variants aside (their own table): nothing measured is hidden, nothing
  missing is averaged."""
  main = main_methods(exp)
  variants = set(exp.get("hypotheses", {})) - set(main)
  named = [*main, *results.get("pretrain", {}),
           *(m for by in results.get("specialize", {}).values() for m in by)]
  cells = [(d, b) for b in exp.budgets for d in budget_domains(results, exp, b)]
  rows = []
  for m in dict.fromkeys(named):
    if m in complete or m in variants:
      continue
    ppl = [view_cell(results, "tokens", f"{d}/{b}", m) for d, b in cells]
    if any(c is not None for c in ppl):
      pre = results.get("pretrain", {}).get(m, {})
      rows.append(f"| {label(m, exp)} | {pre.get('steps', '-')} | "
                  f"{_generic_ppl(results, m, 'tokens')} | "
                  + " | ".join("-" if c is None else f"{c['test_ppl']:.2f}" for c in ppl) + " |")
  if not rows:
    return []
  head = ["method", "pretrain steps", "generic valid ppl"] + [f"{d} {b:.0e}" for d, b in cells]
  return ["Methods whose equal-token fine-tuning did not all run (\"-\": not run), so no macro "
          "average:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|", *rows, ""]


def partial_time_table(results, exp, complete: list[str]) -> list[str]:
  """The equal-time view of methods whose cells did not all run (a run stopped before them):
  their milestone, its generic perplexity and the cells there are, so nothing measured is
  hidden and nothing missing is averaged."""
  eq = results.get("equal_time") or {}
  partial = [m for m in eq.get("methods", {}) if m not in complete]
  if not partial:
    return []
  cells = [(d, b) for b in exp.budgets for d in budget_domains(results, exp, b)]
  head = (["method", "pretrain step", "pretrain s", "generic valid ppl"]
          + [f"{d} {b:.0e}" for d, b in cells])
  lines = ["Methods whose equal-time fine-tuning did not all run (\"-\": not run), so no macro "
           "average:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for m in partial:
    choice = eq["methods"][m]
    ppl = [view_cell(results, "time", f"{d}/{b}", m) for d, b in cells]
    lines.append(f"| {label(m, exp)} | {choice['step']} | {choice['seconds']:.3g} | "
                 f"{choice['generic_valid_ppl']:.2f} | "
                 + " | ".join("-" if c is None else f"{c['test_ppl']:.2f}" for c in ppl) + " |")
  return lines + [""]


def versus(cells: dict[str, dict], ref: dict[str, dict], key: str = "test_ppl"
           ) -> tuple[float, int, int] | None:
  """Macro ppl (`key`: test_ppl, or valid_ppl from each cell's best validation loss) relative
  to the reference's (%), on how many domains it is lower, out of how many: over the domains
  both have (None if none, or if a cell lacks the key)."""
  if key == "valid_ppl":
    if not all("best_valid_loss" in c for c in [*cells.values(), *ref.values()]):
      return None
    at = lambda by: {d: {key: math.exp(c["best_valid_loss"])} for d, c in by.items()}
    cells, ref = at(cells), at(ref)
  common = [d for d in cells if d in ref]
  if not common:
    return None
  a, b = [cells[d] for d in common], [ref[d] for d in common]
  better = sum(x[key] < y[key] for x, y in zip(a, b))
  return 100 * (macro(a, key) / macro(b, key) - 1), better, len(common)


def seed_members(results, exp, budget: int) -> dict[str, list[str]]:
  """Each seed group's members with every cell at the budget (equal tokens)."""
  return {g: [m for m in members if method_cells(results, exp, m, budget) is not None]
          for g, members in exp.get("seed_groups", {}).items()}


def seed_table(results, exp, budget: int) -> list[str]:
  """Each group's runs side by side and their mean (exp of the mean log macro ppl): the spread
  a method's result has from the model seed alone."""
  cap = step_cap(results, exp)
  out = []
  for g, members in seed_members(results, exp, budget).items():
    if not members:
      continue
    cells = [list(method_cells(results, exp, m, budget).values()) for m in members]
    macros = [macro(c, "test_ppl") for c in cells]
    capped = [any(hit_step_cap(x, cap) for x in c) for c in cells]
    out.append(f"| {label(g, exp)} | " + " / ".join(label(m, exp) for m in members) + " | "
               + " / ".join(_generic_ppl(results, m, "tokens") for m in members) + " | "
               + " / ".join(_ppl(v, c) for v, c in zip(macros, capped))
               + f" | {_ppl(geomean(macros), any(capped))} |")
  if not out:
    return []
  return [f"| group | members | generic valid ppl | ft {budget:.0e} per member | mean |",
          "|---" * 5 + "|", *out]


def seed_pairs_table(results, exp, budget: int, base: str = "slm") -> list[str]:
  """Each group's i-th member against the i-th of group `base` (the same seed), then mean
  against mean: whether a lead over the SLM (or a change from a default, `base` its group)
  holds seed by seed. Over the domains both have (a stopped run's are fewer: the counts say
  so); the means over the domains every member of both groups has."""
  groups = exp.get("seed_groups", {})
  if base not in groups:
    return []
  cells = lambda m: available_cells(results, exp, m, budget)
  n_all = len(budget_domains(results, exp, budget))
  have = {g: [m for m in members if cells(m)] for g, members in groups.items()}
  out = [f"| pair | ft {budget:.0e} macro vs | domains better |", "|---" * 3 + "|"]
  for g, members in groups.items():
    if g == base or (base != "slm" and g == "slm"):
      continue
    pairs = [(m, ref) for m, ref in zip(members, groups[base])
             if m in have[g] and ref in have[base] and versus(cells(m), cells(ref))]
    for m, ref in pairs:
      vs = versus(cells(m), cells(ref))
      out.append(f"| {label(m, exp)} vs {label(ref, exp)} | {vs[0]:+.1f}% | {vs[1]}/{vs[2]} |")
    common = set.intersection(*(set(cells(m)) for pair in pairs for m in pair)) if pairs else ()
    if common:  # the same seeds on both sides, the same domains for every run
      mean = lambda side: geomean([macro([cells(pair[side])[d] for d in sorted(common)],
                                          "test_ppl") for pair in pairs])
      over = "" if len(common) == n_all else f", {len(common)} of {n_all} domains"
      out.append(f"| {label(g, exp)} vs {label(base, exp)}, means of {len(pairs)} / "
                 f"{len(pairs)}{over} | {100 * (mean(0) / mean(1) - 1):+.1f}% | - |")
  return out if len(out) > 2 else []


def seeds_section(results, exp) -> list[str]:
  """The seed groups at equal tokens, per budget; none unless a group has two runs."""
  if not any(sum(bool(available_cells(results, exp, m, b)) for m in members) >= 2
             for b in exp.budgets for members in exp.get("seed_groups", {}).values()):
    return []
  lines = ["#### seeds (equal pretraining tokens)", "",
           "The same methods pretrained with other model seeds (GPU runs are not "
           "bit-deterministic either): a difference between methods smaller than the one "
           "between a method's seeds is noise. Mean: exp of the mean of the members' log macro "
           "perplexity; the pairs compare runs of the same seed.", ""]
  for b in exp.budgets:
    for table in (seed_table(results, exp, b), seed_pairs_table(results, exp, b)):
      lines += [*table, ""] if table else []
  bases = exp.get("recipe_baseline", "")
  # The recipe hypotheses against the default they change (and any further baseline, e.g. a
  # tuned SLM), seed by seed.
  for base in _names(bases):
    table = seed_pairs_table(results, exp, min(exp.budgets), base) if base else []
    if table:
      lines += [f"Each method against {label(base, exp)} of the same seed: a change counts "
                "only where both seeds agree.", "", *table, ""]
  return lines


def hypotheses_table(results, exp) -> list[str]:
  """One row per PN variant (one change from PN's defaults) at the smallest budget, each
  against the SLM pretrained like it (same seed, same tokens), over the domains both have:
  which of PN's choices its result depends on. A variant with only some of the domains (a
  stopped run) is compared on those (its macro columns '-'). The change is read off the
  domains' validation splits (what a choice may be made on); the test split is reported."""
  b = min(exp.budgets)
  cap = step_cap(results, exp)
  n_all = len(budget_domains(results, exp, b))
  out = []
  rows = [(m, change, r) for m, (change, refs) in exp.get("hypotheses", {}).items()
          for r in _names(refs)]  # a row per reference
  for m, change, ref in rows:
    cells = available_cells(results, exp, m, b)
    vs = versus(cells, available_cells(results, exp, ref, b))
    if vs is None:
      continue
    valid = versus(cells, available_cells(results, exp, ref, b), key="valid_ppl")
    capped = any(hit_step_cap(c, cap) for c in cells.values())
    whole = len(cells) == n_all
    out.append(f"| {label(m, exp)} | {change} | {label(ref, exp)} | "
               f"{_generic_ppl(results, m, 'tokens')} | {_fit(results['pretrain'].get(m, {}))} | "
               + (f"{macro(list(cells.values()), 'noft_test_ppl'):.2f} | "
                  f"{_ppl(macro(list(cells.values()), 'test_ppl'), capped)} | " if whole
                  else "- | - | ")
               + (f"{valid[0]:+.1f}% | " if valid else "- | ")
               + f"{vs[0]:+.1f}% | {vs[1]}/{vs[2]} |")
  if not out:
    return []
  return ["| method | change | reference | generic valid ppl | train / valid loss | no ft | "
          f"ft {b:.0e} | vs reference, valid | vs reference, test | domains better (test) |",
          "|---" * 10 + "|", *out]


def _names(value) -> tuple:
  """A config entry that names one method or several (a string or a tuple of them)."""
  return (value,) if isinstance(value, str) else tuple(value)


def _fit(record: dict) -> str:
  """Pretraining's final train and valid loss (pn_jax.experiment.pretrain_fit), or '-'."""
  if "train_loss_end" not in record:
    return "-"
  return f"{record['train_loss_end']:.2f} / {record['valid_loss_end']:.2f}"


def hypotheses_section(results, exp) -> list[str]:
  table = hypotheses_table(results, exp)
  if not table:
    return []
  return ["#### what mattered (PN variants, one change each)", "",
          f"Fine-tuned on {min(exp.budgets):.0e} domain tokens; each variant against its "
          "reference (the SLM of the same seed and pretraining cost, or the default the variant "
          "changes), over the domains both have, on the domains' validation splits (what a "
          "choice is made on) and test splits. Train / valid loss: pretraining's last logged "
          "training losses (mean of 8) and its final generic validation loss.", "", *table, ""]


# The paper's Table 8 at 100 GPUh of pretraining (../shared/paper.md): generic c4 ppl, and
# macro-averaged specialized ppl with no fine-tuning, after 1M and after 8M domain tokens.
PAPER_TABLE8 = {"slm": (20.51, 33.74, 19.31, 15.61), "mix": (17.13, 34.35, 19.82, 15.82),
                "pn": (18.90, 33.44, 18.57, 15.58), "llm": (17.00, 29.22, 17.11, 15.49)}


def paper_section(results, rows, exp) -> list[str]:
  """Our equal-token numbers in the shape of the paper's Table 8, its numbers beside them, and
  each method's change vs the SLM in both. Only for the paper's budgets (1M and 8M tokens)."""
  if tuple(exp.budgets) != (1_000_000, 8_000_000):
    return []
  ours = {r["method"]: r for r in rows if r["method"] in PAPER_TABLE8}
  if "slm" not in ours:
    return []

  def values(m):
    r = ours[m]
    return (results["pretrain"][m]["generic_valid_ppl"], r[1_000_000]["noft"],
            r[1_000_000]["macro"], r[8_000_000]["macro"])

  out = ["#### against the paper (Table 8, 100 GPUh)", "",
         "Ours at equal tokens (macro over the domains of each column) | the paper's. "
         "vs SLM: the change of ft 1M / ft 8M against the SLM's.", "",
         "| method | generic ppl | no ft | ft 1M | ft 8M | vs SLM 1M / 8M | paper: generic | "
         "no ft | ft 1M | ft 8M | vs SLM 1M / 8M |", "|---" * 11 + "|"]
  slm, paper_slm = values("slm"), PAPER_TABLE8["slm"]
  for m in ours:
    mine, paper = values(m), PAPER_TABLE8[m]
    vs = lambda v, ref: f"{100 * (v[2] / ref[2] - 1):+.1f}% / {100 * (v[3] / ref[3] - 1):+.1f}%"
    out.append(f"| {label(m, exp)} | " + " | ".join(f"{v:.2f}" for v in mine)
               + f" | {vs(mine, slm)} | " + " | ".join(f"{v:.2f}" for v in paper)
               + f" | {vs(paper, paper_slm)} |")
  return out + [""]


def finetune_lr(exp, budget: int) -> float:
  """The paper's rule (Section 3): fine-tune at the pretraining lr / 3 on small domain sets
  (1M tokens), at the pretraining lr from 8M tokens on; exp.finetune.lr > 0 overrides it."""
  f = exp.finetune
  if f.lr > 0:
    return float(f.lr)
  return exp.pretrain_lr / 3 if budget < f.full_lr_tokens else float(exp.pretrain_lr)


def _lr_rule(exp) -> str:
  """finetune_lr's rule in words, with its values."""
  f = exp.finetune
  small, full = finetune_lr(exp, 0), finetune_lr(exp, f.full_lr_tokens)
  if f.lr > 0:
    return f"{small:g}"
  return (f"{small:g} (the pretraining lr / 3) below {f.full_lr_tokens:.0e} "
          f"domain tokens, {full:g} from there on (the paper's rule)")


def exp_summary(exp) -> str:
  keys = ("source", "domains", "budgets", "pretrain_tokens", "vocab_size", "seq_len",
          "batch_size", "generic_chars")
  return ", ".join(f"{k}={exp[k]}" for k in keys if k in exp)


def gains_figure_name(figure: str) -> str:
  """The % vs the SLM figure beside the cost figure `figure`."""
  return os.path.splitext(figure)[0] + "_vs_slm.png"


def report_budgets(results, exp) -> ml_collections.ConfigDict:
  """`exp` with the budgets some domain holds (e.g. 8M for the large domains only): the
  report's columns and the figures' panels. (A shallow copy: a deep one would sort the keys of
  the config's unsorted dicts, e.g. the hypotheses'.)"""
  exp = ml_collections.ConfigDict(exp)
  exp.budgets = tuple(b for b in exp.budgets if budget_domains(results, exp, b))
  return exp


def write_report(results, exp, docs: str, command: str, tag: str = "",
                 figure: str = "results_ppl_vs_cost.png") -> None:
  """Rewrites the block between this tag's markers in <docs>/results.md (the rest is by hand),
  linking the figures pn_jax.experiment_figures draws (pn_jax.experiment.write_report: both)."""
  os.makedirs(docs, exist_ok=True)
  exp = report_budgets(results, exp)
  tokens, rows = view_section(results, exp, "tokens")
  time_view, _ = view_section(results, exp, "time")
  seeds, hypotheses = seeds_section(results, exp), hypotheses_section(results, exp)
  paper = paper_section(results, rows, exp)
  gains = gains_figure_name(figure)  # both drawn by pn_jax.experiment_figures (the driver)
  f = exp.finetune
  begin, end = (f"<!-- experiment {tag}:begin (written by pn_jax.experiment) -->",
                f"<!-- experiment {tag}:end -->")
  auto = "\n".join([
      begin, "", f"Command: `{command}` (config: `{exp_summary(exp)}`).", "",
      "Macro-averaged test perplexity over the domains (exp of the mean per-token NLL), the "
      "cost of each method, then the per-domain numbers. FLOPs from pn_jax.train.flops "
      "(6 N per token + attention); pretraining seconds are training seconds on "
      f"{devices(results)}; spec s are fine-tuning wall seconds. Fine-tuning: at most "
      f"{f.steps} steps, early stopping (patience {f.early_stop_patience}, eval every "
      f"{f.eval_every}), lr {_lr_rule(exp)}.", "",
      *tokens, *paper, *time_view, *seeds, *hypotheses,
      f"{CAP}: fine-tuning hit the step cap: not converged (the number is an upper bound).", "",
      f"![ppl vs cost]({figure})", "", f"![% vs the SLM per domain]({gains})", "", end])
  path = os.path.join(docs, "results.md")
  text = open(path).read() if os.path.exists(path) else f"# Results\n\n{begin}\n{end}\n"
  if begin in text and end in text:
    text = text[:text.index(begin)] + auto + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + "\n\n" + auto + "\n"
  with open(path, "w") as fh:
    fh.write(text)
  print("\n".join(tokens + paper + time_view + seeds + hypotheses))
