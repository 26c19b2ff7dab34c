"""The importance mode (SLM-is): a small dense model pretrained from scratch on generic data
importance-resampled to match one domain's cluster histogram (pn_jax/specialize/
importance_sampling.py). The result is a normal pretraining run, specialized by plain fine-tuning
(`--mode=specialize`). All its cost is per domain (paper Sec. 2.4).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from pn_jax import workdir_lock
from pn_jax.config import ConfigError, routed, validate
from pn_jax.run import open_run
from pn_jax.data import batches
from pn_jax.data import pipeline
from pn_jax.specialize.importance_sampling import sequence_probs
from pn_jax.train import loop


def pretrain_importance(config: ml_collections.ConfigDict, workdir: str, *,
                        allow_config_change: bool = False) -> dict:
  """The importance mode: an SLM trained from scratch on the domain-resampled generic set."""
  domain = config.data.domain
  if not domain or domain == "all":
    raise ConfigError(f"config.data.domain: importance sampling needs one domain, got {domain!r}")
  if routed(config.model):
    raise ConfigError(f"config.model.mlp_kind: SLM-is trains one dense model, got "
                      f"mlp_kind={config.model.mlp_kind!r}, independent_experts="
                      f"{config.model.get('independent_experts', False)}")
  validate(config, device_count=jax.device_count())  # before the lock creates the workdir
  with workdir_lock.hold(workdir, "importance"):
    return _pretrain_locked(config, workdir, domain, allow_config_change)


def _pretrain_locked(config, workdir: str, domain: str, allow_config_change: bool) -> dict:
  """pretrain_importance, once checked and holding the workdir lock."""
  run = open_run(config, workdir, train_data=True, domain=domain,
                 allow_config_change=allow_config_change)
  hist = pipeline.domain_histogram(run.data, domain, rule="budget",
                                   max_tokens=config.data.domain_tokens or None)
  probs, info = sequence_probs(run.data.train.cluster, hist)
  it = batches.importance_batches(
      run.data, probs, batch_size=config.data.batch_size, seed=config.seed,
      num_workers=config.data.get("num_workers", 0),
      shard=batches.Shard(jax.process_index(), jax.process_count()))
  result = loop.fit(run, it, desc=f"pretrain-is[{domain}]",
                    allow_config_change=allow_config_change)
  if jax.process_index() == 0:  # after fit: a refused resume leaves the run's record as it was
    with open(os.path.join(workdir, "importance.json"), "w") as f:
      json.dump({"domain": domain, **info}, f, indent=1)
  return {"domain": domain, "ess_sequences": info["ess_sequences"], **result}
