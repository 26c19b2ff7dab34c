"""One run of a mode: its config, mesh, model and data, opened in one place for every mode.

A run from scratch (pretrain, importance) takes everything from its config and prepares the
generic corpus in its workdir. Every other run starts from, or reads, a saved checkpoint
(`init_from`): its model is that checkpoint's (or one derived from it), and its data settings,
tokenizer and clusters are those of the pretraining run at the root of the checkpoint's init_from
chain (saved_run.Saved.root, read once).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from pn_jax import saved_run
from pn_jax.config import validate
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train import resume_check


@dataclasses.dataclass
class Run:
  """Everything a mode needs, built once from the config (see open_run)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  rules: tuple
  model: object  # LM or IndependentLM (pn_jax.model.build_model)
  data: pipeline.RunData | None  # None: a mode that reads no data (sample, export)
  source: saved_run.Saved | None = None  # the checkpoint the run's model comes from

  @property
  def root(self) -> saved_run.Saved | None:
    """The pretraining run whose data settings, tokenizer and clusters this run shares."""
    return self.source.root if self.source is not None else None


def unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A mutable copy (the CLI locks the config; modes fill in keys from the checkpoint)."""
  return ml_collections.ConfigDict(config.to_dict())


def tokenizer_path(root: saved_run.Saved, workdir: str = "") -> str:
  """The tokenizer file of a run whose init_from chain ends at `root`: `workdir`'s own copy if
  it has one (a finished specialization writes it), else the pretraining run's (its
  data.tokenizer_path, or the tokenizer it trained into its workdir)."""
  if workdir:
    own = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(own):
      return own
  return root.config.data.tokenizer_path or os.path.join(root.workdir, "tokenizer.model")


def check_domain(data: pipeline.RunData, domain: str) -> None:
  corpus_lib.check_domain(data.root, domain)


def run_config(config: ml_collections.ConfigDict, init_from: saved_run.Saved | None,
               model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """`config` as the run uses it. Without init_from, the config itself; with it, a copy holding
  `model` (default: init_from's) and the data settings of init_from's pretraining run."""
  if init_from is None:
    return config
  config = unlocked(config)
  config.model = init_from.model if model is None else model
  saved_run.inherit_data(config, init_from.root)
  config.data.tokenizer_path = tokenizer_path(init_from.root)
  return config


def open_run(config: ml_collections.ConfigDict, workdir: str, *,
             init_from: saved_run.Saved | None = None,
             model: ml_collections.ConfigDict | None = None, train_data: bool = False,
             load_data: bool = True, domain: str = "",
             allow_config_change: bool = False) -> Run:
  """The run of a mode: its config, data, mesh, rules and model.

  train_data (pretrain, importance; call it holding the workdir lock, since it writes, with a
  config the mode validated before taking the lock): a resume with a changed config is refused
  (unless `allow_config_change`) before any data is prepared, then the generic corpus prepared
  in `workdir` (the pipeline checks the tokenizer's vocabulary against the model). Otherwise
  (init_from required) nothing is
  written: the config is validated and the pretraining run's tokenizer and clusters loaded;
  with load_data=False (sample, export) neither happens (run.data is None; those modes check
  their own keys). `domain`: refused unless it is a domain of the run's corpus.
  """
  if init_from is None and not train_data:
    raise ValueError("open_run: a run that prepares no data of its own needs init_from")
  config = run_config(config, init_from, model)
  if train_data:
    data = _train_data(config, workdir, allow_config_change)
  elif load_data:
    validate(config, device_count=jax.device_count())
    data = saved_run.pretraining_run_data(init_from)
  else:
    data = None
  if domain:
    check_domain(data, domain)
  return Run(config, workdir, mesh_lib.make_mesh(config), mesh_lib.logical_rules(config),
             build_model(config.model), data, init_from)


def _train_data(config: ml_collections.ConfigDict, workdir: str,
                allow_config_change: bool) -> pipeline.RunData:
  """The generic training data of a run from scratch, prepared in `workdir` after a resume with
  a changed config has been refused (a refused resume rebuilds no data artefacts)."""
  if not allow_config_change:
    resume_check.refuse_changed_resume(workdir, config)
  return pipeline.prepare_run_data(config, workdir, process_index=jax.process_index())
