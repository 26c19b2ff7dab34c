"""The modes `main` dispatches to: one module per user journey, each entry `fn(config, workdir,
**kw) -> dict of final metrics`; this table names them."""

from __future__ import annotations

from pn_jax.config import ConfigError
from pn_jax.data import DataError
from pn_jax.data import corpus
from pn_jax.modes import eval as eval_mode
from pn_jax.modes import export, importance, pretrain, prune, sample, specialize
from pn_jax.train import loop
from pn_jax.train.checkpoint import CheckpointError
from pn_jax.train.preflight import WorkdirError

# Errors that mean "the user's input is wrong": reported in one line, exit code 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError, WorkdirError, loop.TrainingDiverged)

# The modes that train (and so resume): they take `allow_config_change` (resume_check.py).
TRAINING_MODES = ("pretrain", "specialize", "importance")

MODES = {
    "pretrain": pretrain.pretrain,
    # Held-out loss/perplexity of `workdir`'s model (any run: pretraining, or specialized: its
    # best step); data.domain "" = generic validation, a name = its test split, "all" = every
    # domain plus the macro average.
    "eval": eval_mode.evaluate,
    # Project (PN/mixture) or take (dense) init_from's model, fine-tune on data.domain.
    "specialize": specialize.specialize,
    # SLM-is: pretrain a dense model on generic data resampled to data.domain's clusters.
    "importance": importance.pretrain_importance,
    # SLM-prune: init_from's dense model cut to config.prune's widths and repaired by least
    # squares on generic calibration batches; the result is a dense run to specialize.
    "prune": prune.prune,
    "sample": sample.sample_mode,
    "export": export.export,
}


def result_line(mode: str, result: dict | None) -> str:
  """The line `python -m pn_jax.main` prints last: the mode's result as strict JSON. A
  non-finite value (the loss of a nan_policy=skip run whose last steps were all skipped, beside
  its skipped_steps count) is null, never a bare NaN that other JSON parsers refuse."""
  return corpus.dumps({"mode": mode, **(result or {})})
