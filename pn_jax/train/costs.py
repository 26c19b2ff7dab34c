"""What each checkpoint of a run cost: training seconds, FLOPs, tokens, and its eval.

Methods are compared at equal device time (paper Sec. 4), so a run records, at every checkpoint,
the cumulative wall-clock seconds spent in training steps next to the work done. process 0 writes
<workdir>/costs.json atomically at every save:

  {"device": "<jax.devices()[0].device_kind>", "device_count": N,
   "steps": {"<step>": {"train_seconds": float, "flops": float, "tokens": int,
                        "eval_loss": float|null, "eval_perplexity": float|null}}}

On resume, entries after the restored step are dropped (that work is redone) and the seconds
continue from the restored step's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax

from pn_jax.data import corpus as corpus_lib

COSTS = "costs.json"


def read_costs(workdir: str) -> dict:
  """<workdir>/costs.json as written (steps keyed by str(step)); {} when the run has none."""
  path = os.path.join(workdir, COSTS)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


class Stopwatch:
  """Cumulative seconds spent training: runs from start() on, except inside paused()."""

  def __init__(self, seconds: float = 0.0):
    self._total = seconds
    self._since: float | None = None

  def start(self) -> None:
    if self._since is None:
      self._since = time.perf_counter()

  @property
  def seconds(self) -> float:
    running = time.perf_counter() - self._since if self._since is not None else 0.0
    return self._total + running

  @contextlib.contextmanager
  def paused(self):
    running = self._since is not None
    if running:
      self._total, self._since = self.seconds, None
    try:
      yield
    finally:
      if running:
        self._since = time.perf_counter()


class CostLog:
  """The costs.json of one run (written by process 0 only)."""

  def __init__(self, workdir: str, *, step_flops: float, step_tokens: int):
    self.path = os.path.join(workdir, COSTS)
    self.enabled = jax.process_index() == 0
    self._step_flops, self._step_tokens = step_flops, step_tokens
    self._steps: dict[str, dict] = {}

  def resume(self, step: int) -> float | None:
    """Keeps the entries up to the restored `step`; -> that step's train_seconds (None if the
    file has no entry for it, e.g. a run from before costs were recorded)."""
    saved = read_costs(os.path.dirname(self.path)).get("steps", {})
    self._steps = {k: v for k, v in saved.items() if int(k) <= step}
    entry = self._steps.get(str(step))
    return None if entry is None else float(entry["train_seconds"])

  def record(self, step: int, train_seconds: float, evaluation: dict | None) -> None:
    if not self.enabled:
      return
    evaluation = evaluation or {}
    self._steps[str(step)] = {
        "train_seconds": float(train_seconds), "flops": float(step * self._step_flops),
        "tokens": int(step * self._step_tokens), "eval_loss": evaluation.get("loss"),
        "eval_perplexity": evaluation.get("perplexity")}
    corpus_lib.write_json(self.path, {"device": jax.devices()[0].device_kind,
                                      "device_count": jax.device_count(), "steps": self._steps})
