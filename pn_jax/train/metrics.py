"""Metric sinks: TensorBoard events, a JSONL log and a one-line stdout summary (process 0 only),
and the one-line step log of the training loop (`step_line`).

The JSONL log outlives crashes: a run killed after step N's checkpoint redoes the steps after N
when it resumes, and a kill mid-write can leave a torn last line. So a writer first cuts the log
back to the restored step (`truncate_log`) and tells TensorBoard to hide its own later events
(`purge_step`); readers go through `read_rows`, which skips a torn line instead of failing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
from absl import logging

from pn_jax.data import corpus

LOG = "metrics.jsonl"


def read_rows(path: str) -> list[dict]:
  """The complete rows of a metrics.jsonl ([] without one); a torn line (a kill mid-write) is
  skipped."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [row for _, row in _parse(f)]


def _parse(lines) -> list[tuple[str, dict]]:
  """(line, row) for each line that is a complete row."""
  rows = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append((line, row))
  return rows


def truncate_log(path: str, step: int) -> int:
  """Rewrites the log at `path` atomically with only its complete rows of steps <= `step` (the
  restored checkpoint's: later steps are about to be redone); -> how many lines it dropped."""
  if not os.path.isfile(path):
    return 0
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = [line for line in text.splitlines() if line.strip()]
  kept = [line for line, row in _parse(lines) if row["step"] <= step]
  if len(kept) == len(lines) and text.endswith("\n") or not text:
    return 0  # (a last row without its newline is rewritten: the next row would join it)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{LOG}.")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.writelines(line + "\n" for line in kept)
      f.flush()
      os.fsync(f.fileno())
    shutil.copymode(path, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return len(lines) - len(kept)


class MetricWriter:
  """Appends to <workdir>/metrics.jsonl and <workdir>/tb. `start_step`: the step training
  (re)starts from (0 for a fresh run): rows and events of later steps are removed first."""

  def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, LOG)
      dropped = truncate_log(path, start_step)
      if dropped:
        logging.warning("%s: dropped %d row(s) after step %d (left by an earlier run that "
                        "stopped before checkpointing them, or torn by a kill)", path, dropped,
                        start_step)
      # TensorBoard hides this run's earlier events of steps >= purge_step when it reads them.
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), purge_step=start_step + 1)
      self._jsonl = open(path, "a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{key}", value, step)
    # strict JSON: a window of skipped (non-finite) steps logs its loss as null, not NaN
    self._jsonl.write(corpus.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self._jsonl.flush()
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
    logging.info("[%s] step %d %s", prefix, step, shown)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def step_line(step: int, scalars: dict[str, float], *, step_flops: float, devices: int) -> str:
  """The one-line step log (MaxText style) of a train log line's `scalars`: the step time and
  per-device throughput in tokens and model FLOPs (pn_jax.train.flops), and MFU when the device
  peak is known (scalars["mfu"])."""
  seconds = scalars["step_time_s"]
  line = (f"completed step: {step}, seconds: {seconds:.3f}, "
          f"TFLOP/s/device: {step_flops / seconds / devices / 1e12:.3f}, "
          f"Tokens/s/device: {scalars['tokens_per_s'] / devices:.1f}, loss: {scalars['loss']:.4f}")
  if "mfu" in scalars:
    line += f", MFU: {100 * scalars['mfu']:.2f}%"
  return line


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
