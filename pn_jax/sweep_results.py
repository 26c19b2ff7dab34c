"""A sweep's results: every point's final metrics (from its metrics.jsonl) in one table.

Writes <root>/results.csv, <root>/results.md and <root>/results.png (a metric against one swept
key, one line per setting of the other keys). Points without metrics stay in the table with
status `missing` (not run yet) or `partial` (stopped before train.steps), never silently dropped.
"""

from __future__ import annotations

import csv
import os

from pn_jax.train import metrics

METRICS = ("step", "train_loss", "eval_loss", "eval_perplexity", "tokens_per_s", "params")


def final_metrics(workdir: str) -> dict:
  """Last train and eval rows of <workdir>/metrics.jsonl -> {step, train_loss, eval_*...}."""
  train, evals = None, None
  for row in metrics.read_rows(os.path.join(workdir, metrics.LOG)):  # (skips a torn line)
    if row.get("split") == "train":
      train = row
    elif row.get("split") == "eval":
      evals = row
  out = {}
  if train:
    out.update(step=train["step"], train_loss=train.get("loss"),
               tokens_per_s=train.get("tokens_per_s"))
  if evals:
    out.update(eval_step=evals["step"], eval_loss=evals.get("loss"),
               eval_perplexity=evals.get("perplexity"))
  return out


def param_count(config) -> int:
  """Total parameters of the run's model (abstract init: no memory, no device work)."""
  import jax
  from pn_jax.model import build_model
  from pn_jax.model.transformer import init_params
  shapes = jax.eval_shape(lambda r: init_params(build_model(config.model), r),
                          jax.random.key(0))
  leaves = jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "shape"))
  total = 0
  for leaf in leaves:
    value = getattr(leaf, "value", leaf)  # nn.Partitioned boxes
    size = 1
    for d in value.shape:
      size *= d
    total += size
  return total


def gather(points) -> list[dict]:
  """One row per point: its overrides, status and final metrics."""
  rows = []
  for p in points:
    m = final_metrics(p.workdir)
    steps = int(p.config.train.steps)
    status = "missing" if not m else ("done" if m.get("step") == steps else "partial")
    row = {"name": p.name, **p.overrides, "status": status}
    row.update({k: m.get(k) for k in METRICS if k != "params"})
    row["params"] = param_count(p.config)
    rows.append(row)
  return rows


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
  return str(v)


def columns(rows: list[dict]) -> list[str]:
  cols = []
  for row in rows:
    cols += [k for k in row if k not in cols]
  return cols


def markdown(rows: list[dict]) -> str:
  cols = columns(rows)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, x: str, y: str = "eval_loss") -> bool:
  """y against x, one line per setting of the other swept keys. -> False if nothing to plot."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  done = [r for r in rows if r.get(y) is not None and r.get(x) is not None]
  if not done:
    return False
  fixed = ("name", "status", x, *METRICS, "eval_step")
  others = [c for c in columns(rows) if c not in fixed]
  groups: dict[tuple, list] = {}
  for r in done:
    groups.setdefault(tuple(r.get(k) for k in others), []).append(r)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
    group.sort(key=lambda r: r[x])
    label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, key)) or None
    ax.plot([r[x] for r in group], [r[y] for r in group], marker="o", label=label)
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.grid(alpha=0.3)
  if others:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_tables(rows: list[dict], root: str, md: str) -> list[str]:
  """results.csv (every column of every row) and results.md (`md`) under root; -> their paths."""
  os.makedirs(root, exist_ok=True)
  csv_path, md_path = os.path.join(root, "results.csv"), os.path.join(root, "results.md")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns(rows))
    writer.writeheader()
    writer.writerows(rows)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(md)
  return [csv_path, md_path]


def write(rows: list[dict], root: str, *, plot_spec: dict | None = None) -> list[str]:
  """results.csv + results.md (+ results.png) under root; -> the paths written."""
  plot_spec = plot_spec or {}
  paths = write_tables(rows, root, markdown(rows))
  swept = [c for c in columns(rows) if c not in ("name", "status", *METRICS, "eval_step")]
  x = plot_spec.get("x") or (swept[0] if swept else None)
  png = os.path.join(root, "results.png")
  if x and plot(rows, png, x, plot_spec.get("y", "eval_loss")):
    paths.append(png)
  return paths
