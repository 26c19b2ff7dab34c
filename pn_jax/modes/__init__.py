"""The modes `main` dispatches to; each is `fn(config, workdir) -> dict of final metrics`."""

from __future__ import annotations

import os

import ml_collections

from pn_jax.config import ConfigError
from pn_jax.data import DataError
from pn_jax.train import loop
from pn_jax.train.checkpoint import CheckpointError
from pn_jax.train.preflight import WorkdirError

# Errors that mean "the user's input is wrong": reported in one line, exit code 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError, WorkdirError, loop.TrainingDiverged)


def pretrain(config: ml_collections.ConfigDict, workdir: str, *,
             allow_config_change: bool = False) -> dict:
  return loop.pretrain(config, workdir, allow_config_change=allow_config_change)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Held-out loss/perplexity of the latest checkpoint in `workdir` (any run: pretraining or
  specialized); data.domain "" = generic validation, a name = its test split, "all" = every
  domain plus the macro average (pn_jax/specialize/evaluate.py)."""
  from pn_jax.specialize import evaluate as evaluate_lib
  return evaluate_lib.evaluate(config, workdir)


def specialize(config: ml_collections.ConfigDict, workdir: str, *,
               allow_config_change: bool = False) -> dict:
  """Project (PN/mixture) or take (dense) init_from's model, fine-tune on data.domain."""
  from pn_jax.specialize import finetune
  return finetune.specialize(config, workdir, allow_config_change=allow_config_change)


def importance(config: ml_collections.ConfigDict, workdir: str, *,
               allow_config_change: bool = False) -> dict:
  """SLM-is: pretrain a dense model on generic data resampled to data.domain's clusters."""
  from pn_jax.specialize import importance as importance_lib
  return importance_lib.pretrain_importance(config, workdir,
                                            allow_config_change=allow_config_change)


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from pn_jax import sample as sample_lib
  return sample_lib.sample_mode(config, workdir)


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes <workdir>/export, holding the workdir lock; a workdir that does not exist is not
  created (export's own error names it)."""
  from pn_jax import export as export_lib
  from pn_jax import workdir_lock
  if not os.path.isdir(workdir):
    return export_lib.export(config, workdir)
  with workdir_lock.hold(workdir, "export"):
    return export_lib.export(config, workdir)


# The modes that train (and so resume): they take `allow_config_change` (resume_check.py).
TRAINING_MODES = ("pretrain", "specialize", "importance")

MODES = {"pretrain": pretrain, "eval": evaluate, "specialize": specialize,
         "importance": importance, "sample": sample, "export": export}
