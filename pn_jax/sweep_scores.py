"""A sweep scored by the specialized model (pn_jax.sweep_parts): one row per point and reference
SLM, sorted by the objective, in <root>/results.csv and results.md, and <root>/results.png.

The objective is the specialized model's macro validation perplexity (exp of the mean over the
domains of each cell's best validation loss; with several budgets, the geometric mean of the
budgets'): choices are made on validation, so test perplexity is reported beside it and never
ranks. Costs are the pretraining run's: training device-seconds (costs.json), FLOPs
(pn_jax.train.flops) and the pretrained network's parameters. `vs_slm_%` is the objective's
change against the SLM pretrained on the same tokens, `vs_slm_time_%` against the SLM fitted to
the `time_of` point's device time.
"""

from __future__ import annotations

import math
import os

from pn_jax import experiment_figures as figures
from pn_jax import experiment_report as report
from pn_jax import sweep_parts, sweep_results
from pn_jax.experiment import token_count

OBJECTIVE = "valid_ppl"
COSTS = ("pretrain_seconds", "pretrain_flops")


def _cells(point, results: dict) -> dict[int, dict[str, tuple[float, float]]]:
  """{budget: {domain: (valid ppl, test ppl)}} of the cells the point has."""
  part, out = point.part, {}
  for d, b in sweep_parts.cells(part, results):
    cell = results["specialize"].get(f"{d}/{b}", {}).get(part.method)
    if cell is not None:
      loss = cell["best_valid_loss"]  # (None: no validation ran)
      out.setdefault(b, {})[d] = (math.nan if loss is None else math.exp(loss), cell["test_ppl"])
  return out


def score(point, results: dict | None, refs: dict[str, dict] | None = None,
          keys: tuple[str, ...] = ()) -> dict:
  """One point's row: its overrides (at the swept `keys`; '' for a reference), status,
  objective and test macro, their changes against `refs` (the reference SLMs' rows), costs,
  every cell."""
  results = results or {"pretrain": {}, "specialize": {}}
  part = point.part
  pre = results["pretrain"].get(part.method)
  by_budget = _cells(point, results)
  wanted = {b: report.budget_domains(results, part.exp, b) for b in part.exp.budgets}
  wanted = {b: ds for b, ds in wanted.items() if ds}
  complete = pre is not None and all(len(by_budget.get(b, {})) == len(ds)
                                     for b, ds in wanted.items())
  macros = {b: [report.geomean([c[i] for c in by_budget[b].values()]) for i in (0, 1)]
            for b in wanted} if complete else {}
  row = {"name": point.name, **{k: point.overrides.get(k, "") for k in keys}, **point.overrides,
         "status": "done" if complete else "partial" if pre or by_budget else "missing"}
  for i, key in enumerate((OBJECTIVE, "test_ppl")):
    row[key] = report.geomean([m[i] for m in macros.values()]) if macros else None
  for ref in (refs or {}).values():
    timed = "_time" if ref["name"] != sweep_parts.REFERENCE else ""
    row[f"vs_slm{timed}_%"] = _change(row[OBJECTIVE], ref[OBJECTIVE])
    if not timed:
      row["vs_slm_test_%"] = _change(row["test_ppl"], ref["test_ppl"])
  row.update(generic_valid_ppl=pre["generic_valid_ppl"] if pre else None,
             pretrain_steps=pre["steps"] if pre else None,
             pretrain_seconds=report.pretrain_seconds(pre) if pre else None,
             pretrain_flops=pre["flops"] if pre else None,
             params=sweep_results.param_count(part.config))
  if len(wanted) > 1:
    for b, (valid, test) in macros.items():
      row.update({f"valid_ppl_{token_count(b)}": valid, f"test_ppl_{token_count(b)}": test})
  for b, domains in by_budget.items():
    for d, (valid, test) in domains.items():
      row.update({f"{d}_{token_count(b)}_valid": valid, f"{d}_{token_count(b)}_test": test})
  return row


def _change(value, ref) -> float | None:
  return None if value is None or not ref else 100 * (value / ref - 1)


def gather(points, results: dict | None) -> list[dict]:
  """Every point's row with its changes against the reference SLMs, sorted by the objective
  (rows without one last, in the sweep's order)."""
  keys = tuple(dict.fromkeys(k for p in points for k in p.overrides))
  refs = {p.name: score(p, results) for p in points if p.part.reference}
  rows = [score(p, results, refs, keys) for p in points]
  return sorted(rows, key=lambda r: (r[OBJECTIVE] is None, r[OBJECTIVE] or 0.0))


def _shown(key: str, value) -> str:
  if value is None:
    return ""
  if key.endswith("_%"):
    return f"{value:+.1f}%"
  if key in ("pretrain_flops", "pretrain_seconds"):
    return f"{value:.3g}"
  if key == "params":
    return f"{value:,}"
  return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
  """Two tables, both in the objective's order: the summary (objective, test, changes, costs),
  then every cell's validation and test perplexity."""
  cols = sweep_results.columns(rows)
  split = cols.index("params") + 1
  lines = ["Sorted by the objective, valid_ppl: the specialized model's macro validation "
           "perplexity (test_ppl beside it, never used to rank); vs_slm_%: against the SLM "
           "pretrained on the same tokens.", ""]
  for table in (cols[:split], ["name", *cols[split:]]):
    lines += ["| " + " | ".join(table) + " |", "|" + "---|" * len(table)]
    lines += ["| " + " | ".join(_shown(c, r.get(c)) for c in table) + " |" for r in rows]
    lines.append("")
  return "\n".join(lines)


def _short(name: str) -> str:
  """A point's name without its k (the figure's line says it): 'k=4,h=8' -> 'h=8'."""
  key = lambda item: item.split("=")[0]
  kept = [i for i in name.split(",") if key(i) != "k" and not key(i).endswith(".k")]
  return ",".join(kept) or name


def _draw_points(ax, groups: dict, x: str, y: str) -> None:
  style = figures.styles([f"k={k}" for k in groups])
  for k, rows in groups.items():
    rows = sorted(rows, key=lambda r: r[x])
    color, marker = style[f"k={k}"]
    ax.plot([r[x] for r in rows], [r[y] for r in rows], marker=marker, color=color,
            label=f"PN k={k}")
    for r in rows:
      ax.annotate(_short(r["name"]), (r[x], r[y]), xytext=(4, 3), textcoords="offset points",
                  fontsize=7, color=color)


def _draw_references(ax, refs: list[dict], x: str, y: str) -> None:
  refs = sorted(refs, key=lambda r: r[x])
  if len(refs) > 1:
    ax.plot([r[x] for r in refs], [r[y] for r in refs], linestyle=":", color="black")
  for r in refs:
    same = r["name"] == sweep_parts.REFERENCE
    ax.plot(r[x], r[y], marker="*" if same else "D", markersize=11 if same else 7,
            color="black", linestyle="none",
            label="SLM, same tokens" if same else
            f"SLM at {r['name'].partition('@')[2]}'s device time")


def _cost_axis(ax, xs: list[float], x: str) -> None:
  from matplotlib import ticker
  if min(xs) > 0 and max(xs) / min(xs) > 4:
    ax.set_xscale("log")
  else:  # close together (equal tokens: about the SLM's FLOPs): a margin, plain numbers
    ax.set_xlim(0.97 * min(xs), 1.03 * max(xs))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
  ax.set_xlabel("pretraining device-seconds (training)" if x == "pretrain_seconds"
                else "pretraining FLOPs", fontsize=8)
  ax.grid(alpha=0.3)


def plot(rows: list[dict], points, path: str, x: str) -> bool:
  """The specialized model's macro perplexity (validation: the objective; test) against
  pretraining cost `x`: one line per k through its points in cost order, the SLMs as black
  markers. -> False if no point has both."""
  drawn = {r["name"]: r for r in rows if r[OBJECTIVE] is not None and r[x] is not None}
  if not drawn:
    return False
  groups: dict[int, list[dict]] = {}
  for p in sorted(points, key=lambda p: p.config.model.k):
    if not p.part.reference and p.name in drawn:
      groups.setdefault(p.config.model.k, []).append(drawn[p.name])
  refs = [drawn[p.name] for p in points if p.part.reference and p.name in drawn]
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
  for ax, y, what in zip(axes, (OBJECTIVE, "test_ppl"), ("validation (the objective)", "test")):
    _draw_points(ax, groups, x, y)
    _draw_references(ax, refs, x, y)
    _cost_axis(ax, [r[x] for r in drawn.values()], x)
    ax.set_ylabel(f"specialized model: macro {what.split()[0]} ppl", fontsize=8)
    ax.set_title(f"{what}, lower is better", fontsize=9)
  figures.legend_outside_and_save(fig, axes, path)
  return True


def write(rows: list[dict], points, root: str, x: str) -> list[str]:
  """results.csv, results.md (+ results.png) under root; -> the paths written."""
  paths = sweep_results.write_tables(rows, root, markdown(rows))
  png = os.path.join(root, "results.png")
  return paths + [png] if plot(rows, points, png, x) else paths
