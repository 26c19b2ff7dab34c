"""The modes `main` dispatches to; each is `fn(config, workdir) -> dict of final metrics`."""

from __future__ import annotations

import jax
import ml_collections

from pn_jax.config import ConfigError
from pn_jax.data import DataError
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train import loop
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import state_shardings
from pn_jax.train.step import make_eval_step

# Errors that mean "the user's input is wrong": reported in one line, exit code 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError, loop.TrainingDiverged)


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return loop.pretrain(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Held-out loss/perplexity of the latest checkpoint in `workdir`."""
  run = loop.setup(config, workdir)
  tx, _ = make_optimizer(config)
  ckpt = Checkpointer(workdir, read_only=True)
  with mesh_lib.activate(run.mesh, run.rules):
    abstract, shardings = state_shardings(run.model, tx, run.mesh, run.rules)
    params = ckpt.restore_params(abstract.params)
    eval_step = jax.jit(make_eval_step(run.model, config),
                        in_shardings=(shardings.params, mesh_lib.batch_sharding(run.mesh)))
    split = "test" if config.data.domain else "validation"
    result = loop.evaluate(run, eval_step, params, split=split)
  return {"step": ckpt.latest_step(), "split": split, **result}


MODES = {"pretrain": pretrain, "eval": evaluate}
