"""Metric sinks: TensorBoard events, a JSONL log and a one-line stdout summary (process 0 only)."""

from __future__ import annotations

import json
import os

import jax
from absl import logging


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{key}", value, step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
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


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
