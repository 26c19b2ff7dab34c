"""Early stopping on the eval loss, as state that is saved with each checkpoint.

The best step decides which checkpoint a specialization reports, so a resumed fine-tuning must
continue with the same best loss, best step and patience count as the run it resumes: the state
round-trips through `to_json`/`from_json` (the checkpoint's `progress` item).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EarlyStop:
  """patience > 0: stop after that many evals in a row without a lower eval loss (0: never)."""

  patience: int
  best_loss: float = float("inf")
  best_step: int = 0
  evals_since: int = 0

  def update(self, step: int, loss: float) -> bool:
    """Records the eval at `step`; -> True when training should stop."""
    if loss < self.best_loss:
      self.best_loss, self.best_step, self.evals_since = loss, step, 0
    else:
      self.evals_since += 1
    return self.stopped

  @property
  def stopped(self) -> bool:
    return bool(self.patience) and self.evals_since >= self.patience

  def to_json(self) -> dict:
    best = self.best_loss if self.best_step else None  # JSON has no inf
    return {"best_loss": best, "best_step": self.best_step, "evals_since": self.evals_since}

  @classmethod
  def from_json(cls, patience: int, saved: dict | None) -> "EarlyStop":
    if not saved:
      return cls(patience)
    best = saved["best_loss"]
    return cls(patience, float("inf") if best is None else float(best), int(saved["best_step"]),
               int(saved["evals_since"]))
