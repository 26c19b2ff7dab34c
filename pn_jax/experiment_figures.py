"""The comparison's figures, what a reader looks at before the tables (docs/results.md):

  <name>.png       per budget, specialized perplexity against pretraining cost: one colour and
                   marker per method, a seed group as its mean with the seeds' range as error
                   bars, the legend outside the axes, no labels on the data;
  <name>_vs_slm.png
                   per budget, each method's change against the SLM (`exp.figure_reference`:
                   another baseline, e.g. a tuned SLM) per domain (bars), the macro last.

Which methods: `exp.figure_methods` where the config names them (a comparison with many recipe
variants shows those in its tables, not here), else the paper's methods and the config's own;
a method in a seed group is drawn as the group. Costs and cells come from experiment_report.
"""

from __future__ import annotations

import itertools

import numpy as np

from pn_jax import experiment_report as report

MARKERS = "osD^v<>PXhp*"
COLORS = [f"C{i}" for i in range(10)]


def pyplot():
  """pyplot on the Agg backend: figures are files (no display on a cluster or in CI)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def legend_outside_and_save(fig, axes, path: str) -> None:
  """One legend for every panel (each label once), right of the axes, then the PNG."""
  handles = {}
  for ax in axes:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
             fontsize=8, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=130, bbox_inches="tight")
  pyplot().close(fig)


def styles(names) -> dict[str, tuple[str, str]]:
  """name -> (colour, marker), every pair distinct: colours cycle first, the marker changes
  after each ten (so the 11th method is C0 with another marker, never C0 'o' again)."""
  pairs = ((c, m) for m, c in itertools.product(MARKERS, COLORS))
  return dict(zip(dict.fromkeys(names), pairs))


def figure_groups(results, exp) -> dict[str, list[str]]:
  """name -> its runs (seeds): the methods drawn, each once."""
  wanted = list(exp.get("figure_methods", ()) or
                [m for m in ("slm", "mix", "pn", "llm", "slm_d", "slm_is", *exp.methods,
                             *report.pruned_methods(exp))])
  groups = dict(exp.get("seed_groups", {}))
  member_of = {m: g for g, members in groups.items() for m in members}
  out = {}
  for m in dict.fromkeys(wanted):
    g = member_of.get(m, m)
    runs = [r for r in groups.get(g, (m,)) if r in results["pretrain"] or r in ("slm_d", "slm_is")]
    if g not in out and runs:
      out[g] = runs
  return out


def _point(results, exp, runs, budget):
  """(FLOPs, geometric mean of the runs' macro ppl, lowest, highest, n) over the runs with every
  domain of the budget; None without one."""
  macros, flops = [], []
  for m in runs:
    cells = report.method_cells(results, exp, m, budget)
    if cells is None:
      continue
    row = {budget: {"is_flops": np.mean([c.get("is_pretrain_flops", 0.0) for c in cells.values()]),
                    "is_seconds": 0.0}}
    flops.append(report.pretrain_cost(results, m, row, budget)[0])
    macros.append(report.macro(list(cells.values()), "test_ppl"))
  if not macros:
    return None
  return float(np.mean(flops)), report.geomean(macros), min(macros), max(macros), len(macros)


def _name(results, exp, group, runs) -> str:
  n = sum(1 for m in runs if any(report.method_cells(results, exp, m, b) is not None
                                 for b in exp.budgets))
  return report.label(runs[0], exp) + (f" ({n} seeds)" if n > 1 else "")


def cost_figure(results, exp, path: str) -> list[str]:
  """Writes <path>: specialized ppl against pretraining FLOPs, a panel per budget. -> the groups
  drawn (each once)."""
  plt = pyplot()
  from matplotlib import ticker

  groups = figure_groups(results, exp)
  style = styles(groups)
  budgets = list(exp.budgets)
  # Costs as multiples of the SLM's (one number a reader can compare), else in FLOPs.
  slm = results["pretrain"].get("slm", {}).get("flops")
  unit, scale = ("the SLM's", slm) if slm else ("FLOPs", 1.0)
  fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets) + 2.8, 3.8),
                           squeeze=False)
  drawn = {}
  for ax, b in zip(axes[0], budgets):
    for g, runs in groups.items():
      p = _point(results, exp, runs, b)
      if p is None:
        continue
      flops, mean, lo, hi, n = p
      color, marker = style[g]
      ax.errorbar(flops / scale, mean, yerr=[[mean - lo], [hi - mean]] if n > 1 else None,
                  fmt=marker, color=color, markersize=7, capsize=3, linestyle="none",
                  label=_name(results, exp, g, runs))
      drawn[g] = True
    xs = [x for line in ax.lines for x in line.get_xdata()]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 4:  # far apart (SLM-d, the LLM): log scale
      ax.set_xscale("log")
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    elif xs:  # close together: a margin around them, plain numbers (no offset)
      ax.set_xlim(0.9 * min(xs), 1.1 * max(xs))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_title(f"fine-tuned on {b:.0e} domain tokens "
                 f"({len(report.budget_domains(results, exp, b))} domains)", fontsize=9)
    ax.set_xlabel(f"pretraining FLOPs per specialized model ({unit}"
                  f"{' = 1' if slm else ''})", fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("macro test perplexity (lower is better)", fontsize=8)
  legend_outside_and_save(fig, axes.flat, path)
  return list(drawn)


def per_domain_change(results, exp, runs, ref_runs, budget) -> dict[str, float] | None:
  """{domain or 'macro': % change of the runs' geometric mean ppl against the reference's}, over
  the runs (and reference runs) with every domain of the budget."""
  def by_domain(ms):
    full = [report.method_cells(results, exp, m, budget) for m in ms]
    full = [c for c in full if c is not None]
    if not full:
      return None
    return {d: report.geomean([c[d]["test_ppl"] for c in full]) for d in full[0]}
  mine, ref = by_domain(runs), by_domain(ref_runs)
  if mine is None or ref is None:
    return None
  out = {d: 100 * (mine[d] / ref[d] - 1) for d in mine}
  out["macro"] = 100 * (report.geomean(list(mine.values())) /
                        report.geomean(list(ref.values())) - 1)
  return out


def gain_figure(results, exp, path: str) -> list[str]:
  """Writes <path>: per budget, each group's change against the SLM's group per domain. -> the
  groups drawn."""
  plt = pyplot()

  groups = figure_groups(results, exp)
  ref = exp.get("figure_reference", "") or "slm"
  ref_group = next((g for g, runs in groups.items() if ref in runs), None)
  if ref_group is None:
    return []
  others = {g: r for g, r in groups.items() if g != ref_group}
  style = styles(groups)
  by_budget = {b: {g: c for g, runs in others.items()
                   if (c := per_domain_change(results, exp, runs, groups[ref_group], b))}
               for b in exp.budgets}
  by_budget = {b: changes for b, changes in by_budget.items() if changes}  # no empty panels
  if not by_budget:
    return []
  fig, axes = plt.subplots(len(by_budget), 1, figsize=(9.0, 2.9 * len(by_budget)),
                           squeeze=False)
  drawn = {}
  for ax, (b, changes) in zip(axes[:, 0], by_budget.items()):
    keys = [*report.budget_domains(results, exp, b), "macro"]
    width = min(0.8 / max(len(changes), 1), 0.25)
    for i, (g, c) in enumerate(changes.items()):
      color, _ = style[g]
      x = np.arange(len(keys)) + (i - (len(changes) - 1) / 2) * width
      ax.bar(x, [c.get(k, np.nan) for k in keys], width, color=color,
             hatch=None if style[g][1] == "o" else "//", edgecolor="white",
             label=_name(results, exp, g, others[g]))
      drawn[g] = True
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(keys)), keys, fontsize=8)
    ax.set_ylabel(f"% vs {_name(results, exp, ref_group, groups[ref_group])}\n"
                  "(below 0: better)", fontsize=8)
    ax.set_title(f"fine-tuned on {b:.0e} domain tokens", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  legend_outside_and_save(fig, axes.flat, path)
  return list(drawn)


def write_figures(results, exp, docs: str, figure: str) -> None:
  """Both figures of a report, named as write_report links them."""
  exp = report.report_budgets(results, exp)
  cost_figure(results, exp, f"{docs}/{figure}")
  gain_figure(results, exp, f"{docs}/{report.gains_figure_name(figure)}")
