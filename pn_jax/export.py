"""Export a (specialized) small model as safetensors + a JSON config, and load it back.

    python -m pn_jax.main --config=configs/finetune.py:tiny --workdir=runs/pn_legal --mode=export

writes <workdir>/export/{model.safetensors, config.json, tokenizer.model}. Tensor names are the
flax param paths joined by "." (e.g. "blocks.attn.wq", stacked over layers on axis 0); the JSON
holds the model config that pn_jax.model.transformer.LM needs, so `load(dir)` rebuilds the model
and reproduces the checkpoint's logits exactly (tests/test_export.py). A PN, mixture or
independent-experts checkpoint is projected onto config.sample.cluster first: what is exported is
always a dense model.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from pn_jax.config import ConfigError, expert_of, routed
from pn_jax.model.transformer import LM
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.specialize import checkpoints
from pn_jax.specialize.finetune import unlocked
from pn_jax.specialize.project import project

FORMAT = "pn-jax-dense-lm/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def flatten(params) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat[".".join(str(k.key) for k in path)] = np.asarray(jax.device_get(leaf))
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save(out_dir: str, params, model_cfg: ml_collections.ConfigDict, *, tokenizer_path: str = "",
         metadata: dict | None = None) -> str:
  os.makedirs(out_dir, exist_ok=True)
  save_file(flatten(params), os.path.join(out_dir, WEIGHTS), metadata={"format": FORMAT})
  info = {"format": FORMAT, "model": model_cfg.to_dict(), **(metadata or {})}
  if tokenizer_path and os.path.exists(tokenizer_path):
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    info["tokenizer"] = "tokenizer.model"
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(info, f, indent=1, default=float)
  return out_dir


def load(out_dir: str) -> tuple[LM, dict, dict]:
  """-> (model, params (numpy), the JSON config)."""
  with open(os.path.join(out_dir, CONFIG)) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{out_dir}/{CONFIG} has format {info.get('format')!r}, expected {FORMAT!r}")
  params = unflatten(load_file(os.path.join(out_dir, WEIGHTS)))
  return LM(ml_collections.ConfigDict(info["model"])), params, info


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The export mode: latest checkpoint of `workdir` -> <workdir>/export."""
  saved = checkpoints.load_saved(workdir)
  cfg = unlocked(config)
  cfg.model = saved.model
  mesh, rules = mesh_lib.make_mesh(cfg), mesh_lib.logical_rules(cfg)
  with mesh_lib.activate(mesh, rules):
    params = checkpoints.restore_params(saved, mesh, rules)
  model_cfg, meta = saved.model, {"step": saved.step, "source": saved.workdir}
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
  root = checkpoints.root_run(workdir)
  tok = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(tok):
    tok = root.config.data.tokenizer_path or os.path.join(root.workdir, "tokenizer.model")
  out = save(os.path.join(workdir, "export"), params, model_cfg, tokenizer_path=tok,
             metadata=meta)
  n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
  return {"export_dir": out, "parameters": n, **meta}
