"""The export mode: a run's model as a dense model, in one of two formats.

    python -m pn_jax.main --config=configs/finetune.py:tiny --workdir=runs/pn_legal --mode=export

config.export.format:
  pn (default)  <workdir>/export/{model.safetensors, config.json, tokenizer.model}: pn-jax's
                layout (pn_jax/safetensors_io.py), which reloads into pn_jax.model.
  hf            <workdir>/export_hf: a Hugging Face transformers directory with its tokenizer
                (pn_jax/hf_export.py): arch gpt (the default) as ArceeForCausalLM, llama as
                LlamaForCausalLM; config.export.dtype float32 (default) or bfloat16.
A PN, mixture or independent-experts checkpoint is projected onto config.sample.cluster first:
what is exported is always a dense model. The checkpoint is the run's result
(saved_run.load_result): a finished specialization's best step, the model whose test perplexity
specialize.json reports, else the latest; config.json records it (`step`, and `step_chosen`:
why that step).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from pn_jax import hf_export, safetensors_io, saved_run, workdir_lock
from pn_jax.config import ConfigError, expert_of, routed, validate
from pn_jax.data import tokenizer as tok_lib
from pn_jax.model.model_config import ModelConfig
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.run import open_run, tokenizer_path
from pn_jax.specialize.project import project

OUT_DIRS = {"pn": "export", "hf": "export_hf"}  # config.export.format -> <workdir>/<name>


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes <workdir>/export (or export_hf), holding the workdir lock; a workdir that does not
  exist is not created (export's own error names it)."""
  validate(config)  # config.export.format, before a checkpoint is read
  if not os.path.isdir(workdir):
    return _export(config, workdir)
  with workdir_lock.hold(workdir, "export"):
    return _export(config, workdir)


def _export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The export mode: `workdir`'s model (saved_run.load_result) -> <workdir>/export[_hf]."""
  fmt = config.export.format
  out = os.path.join(workdir, OUT_DIRS[fmt])
  if fmt == "hf":
    safetensors_io.check_target(out, hf_export.FILES, hf_export.FORMAT)  # before any work
  else:
    safetensors_io.check_target(out)
  saved = saved_run.load_result(workdir, mode="export")
  if fmt == "hf":  # before the checkpoint is read: nothing is written for a model it refuses
    hf_export.check_exportable(ModelConfig.from_config(saved.model), saved.describe())
    hf_export.check_dtype(config.export.dtype)
  run = open_run(config, workdir, init_from=saved, load_data=False)
  with mesh_lib.activate(run.mesh, run.rules):
    params = saved_run.restore_params(saved, run.mesh, run.rules)
  model_cfg, meta = saved.model, {"step": saved.step, "step_chosen": saved.chosen,
                                  "source": saved.workdir}
  if routed(model_cfg):
    cluster = int(config.sample.cluster)
    if cluster < 0:
      raise ConfigError(f"config.sample.cluster: {saved.describe()} has one expert per cluster; "
                        "pass the expert to export (--config.sample.cluster=<id>) or export a "
                        "specialized run")
    expert_of(cluster, model_cfg, saved.describe())  # a cluster >= k: refused, not clamped
    params, model_cfg = project(params, model_cfg, cluster)
    meta["cluster"] = cluster
  meta.update({k: saved.config.get(k) for k in ("init_from",) if saved.config.get(k)})
  meta["domain"] = saved.config.data.get("domain", "")
  tok = tokenizer_path(run.root, workdir)
  if fmt == "hf":
    byte = run.root.config.data.tokenizer == tok_lib.BYTE
    out = hf_export.save(out, params, ModelConfig.from_config(model_cfg),
                         tokenizer=tok_lib.BYTE if byte else tok, metadata=meta,
                         dtype=config.export.dtype)
  else:
    out = safetensors_io.save(out, params, model_cfg, tokenizer_path=tok, metadata=meta)
  n = sum(int(np.prod(v.shape)) for v in safetensors_io.flatten(params).values())
  return {"export_dir": out, "parameters": n, "format": fmt, **meta}
