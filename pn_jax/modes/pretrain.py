"""The pretrain mode: a model trained from scratch (or resumed) on the generic corpus."""

from __future__ import annotations

import jax
import ml_collections

from pn_jax import workdir_lock
from pn_jax.config import validate
from pn_jax.data import batches
from pn_jax.parallel import distributed
from pn_jax.run import open_run
from pn_jax.train import loop


def pretrain(config: ml_collections.ConfigDict, workdir: str, *,
             allow_config_change: bool = False) -> dict[str, float]:
  """Trains (or resumes) to config.train.steps on the generic corpus; returns final metrics.
  The config is checked before the workdir lock creates the workdir (a refused run leaves none)."""
  validate(config, device_count=jax.device_count())
  with workdir_lock.hold(workdir, "pretrain"):  # also checks it is writable, before data prep
    run = open_run(config, workdir, train_data=True, allow_config_change=allow_config_change)
    d = config.data
    train_iter = batches.train_batches(
        run.data, batch_size=d.batch_size, mode=d.cluster_batching, seed=config.seed,
        num_workers=d.get("num_workers", 0),
        shard=batches.Shard(**distributed.data_shard(run.mesh, d.batch_size)))
    return loop.fit(run, train_iter, allow_config_change=allow_config_change)
