"""SLM-prune: the LLM cut to the SLM's widths (specialize/structured_pruning.py, mode prune)."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, quiet, snapshot
from pn_jax import modes, saved_run
from pn_jax.config import ConfigError, validate
from pn_jax.model import build_model
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.transformer import init_params
from pn_jax.modes.pretrain import pretrain
from pn_jax.specialize import structured_pruning as prune_lib
from pn_jax.train import flops as flops_lib


def tiny_llm_cfg(**changes) -> ModelConfig:
  return dataclasses.replace(ModelConfig.from_config(load_config("llm").model), **changes)


def random_params(cfg: ModelConfig, seed: int = 0):
  params = nn.unbox(init_params(build_model(cfg), jax.random.key(seed)))
  # norm scales away from 1, so matching them is exercised
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x * (1 + 0.2 * jax.random.normal(k, x.shape)) for x, k in
                                   zip(leaves, keys)])


def tokens(cfg: ModelConfig, n: int = 2, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.randint(k, (2, 16), 0, cfg.vocab_size) for k in keys]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_pure_forward_is_the_lm(arch):
  """Importance and repair run on prune.forward's pieces: they are the LM's, in float32."""
  cfg = tiny_llm_cfg(arch=arch, activation="silu" if arch == "llama" else "gelu")
  params = random_params(cfg)
  t = tokens(cfg)[0]
  want = build_model(cfg).apply({"params": params}, t, jnp.zeros((2,), jnp.int32))
  np.testing.assert_allclose(prune_lib.forward(params, t, cfg), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_keeping_everything_reproduces_the_llm(tied):
  """A keep-all pruning, repair included, is the LLM: the norm ratios are 1 and the
  least-squares solution is the original weights."""
  cfg = tiny_llm_cfg(tie_embeddings=tied)
  params, batches = random_params(cfg), tokens(cfg)
  shape = prune_lib.pruned_shape(cfg, cfg.d_model, cfg.mlp_dim)
  keep = prune_lib.choose(prune_lib.importance(params, batches, cfg), shape)
  out = prune_lib.repair(params, prune_lib.slice_params(params, keep), keep, batches, cfg)
  t = tokens(cfg, seed=5)[0]
  np.testing.assert_allclose(prune_lib.forward(out, t, cfg), prune_lib.forward(params, t, cfg),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_pruned_model_has_the_slm_widths_and_flops(arch):
  """LLM (d 128, 4 heads of 32, MLP 512) -> d 64, MLP 256: 2 heads of 32, the tiny SLM's
  d_model and MLP width; its params are a model of that config's, and its FLOPs per token equal
  the SLM's (attention width = d_model either way)."""
  cfg = tiny_llm_cfg(arch=arch, activation="silu" if arch == "llama" else "gelu")
  slm = load_config("slm").model
  params, batches = random_params(cfg), tokens(cfg)
  shape = prune_lib.pruned_shape(cfg, slm.d_model, slm.mlp_dim)
  assert (shape.d_model, shape.n_heads, shape.mlp_dim) == (64, 2, 256)
  keep = prune_lib.choose(prune_lib.importance(params, batches, cfg), shape)
  out = prune_lib.repair(params, prune_lib.slice_params(params, keep), keep, batches, cfg)
  small = prune_lib.pruned_config(cfg, shape)
  want = jax.eval_shape(lambda: nn.unbox(init_params(build_model(small), jax.random.key(0))))
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, want)
  slm.update(arch=arch)
  flops = lambda m: flops_lib.train_flops_per_step(m, 8, 64)
  assert flops(small) == flops(slm) < flops(cfg)
  # each layer keeps its own heads and neurons, sorted, and the channels are shared
  assert keep.heads.shape == (cfg.n_layers, 2) and keep.neurons.shape == (cfg.n_layers, 256)
  assert all((np.diff(k) > 0).all() for k in (keep.channels, *keep.heads, *keep.neurons))


def test_importance_keeps_what_carries_the_signal():
  """A neuron whose output weights are zero writes nothing and a head with zero wo neither:
  they are scored 0 and pruned first; a channel the norms zero out is dropped."""
  cfg = tiny_llm_cfg()
  params = random_params(cfg)
  blocks = params["blocks"]
  blocks["mlp"]["w_out"] = blocks["mlp"]["w_out"].at[0, 7].set(0.0)
  blocks["attn"]["wo"] = blocks["attn"]["wo"].at[1, 2].set(0.0)
  for norm in ("attn_norm", "mlp_norm"):
    blocks[norm]["scale"] = blocks[norm]["scale"].at[:, 3].set(0.0)
  params["final_norm"]["scale"] = params["final_norm"]["scale"].at[3].set(0.0)
  scores = prune_lib.importance(params, tokens(cfg), cfg)
  assert scores["neurons"][0, 7] == 0 and scores["heads"][1, 2] == 0
  assert scores["channels"][3] == 0
  keep = prune_lib.choose(scores, prune_lib.pruned_shape(cfg, 96, 500))
  assert 7 not in keep.neurons[0] and 2 not in keep.heads[1] and 3 not in keep.channels


def test_the_ridge_step_fits_what_the_sliced_weights_miss():
  rng = np.random.default_rng(0)
  a, w = rng.normal(size=(200, 6)), rng.normal(size=(6, 3))
  assert not prune_lib.ridge_step(a.T @ a, a.T @ (a @ w - a @ w), 1e-3).any()  # nothing missed
  y = rng.normal(size=(200, 3))  # a target the sliced weights w miss: the refit is closer
  fit = w + prune_lib.ridge_step(a.T @ a, a.T @ (y - a @ w), 1e-6)
  best = np.linalg.lstsq(a, y, rcond=None)[0]
  np.testing.assert_allclose(fit, best, atol=1e-4)  # a small ridge: least squares
  assert np.sum((a @ fit - y) ** 2) < np.sum((a @ w - y) ** 2)


def test_shapes_it_cannot_prune_to_are_refused():
  cfg = tiny_llm_cfg()  # head_dim 32
  with pytest.raises(ConfigError, match="multiple of the source's head_dim 32"):
    prune_lib.pruned_shape(cfg, 48, 256)
  with pytest.raises(ConfigError, match=r"prune.mlp_dim: 1024 must be in \[1, 512\]"):
    prune_lib.pruned_shape(cfg, 64, 1024)
  with pytest.raises(ConfigError, match="pruning takes a dense model"):
    prune_lib.pruned_shape(ModelConfig.from_config(load_config("pn").model), 32, 128)
  config = load_config("prune")
  config.prune.ridge = 0.0
  with pytest.raises(ConfigError, match="config.prune.ridge: must be > 0"):
    validate(config)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  """A tiny LLM pretrained for 40 steps."""
  workdir = str(tmp_path_factory.mktemp("llm"))
  pretrain(quiet(load_config("llm"), steps=40, eval_every=40, checkpoint_every=40), workdir)
  return workdir


@pytest.fixture(scope="module")
def pruned(llm, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pruned"))
  config = load_config("prune")
  config.init_from = llm
  return workdir, modes.MODES["prune"](config, workdir)


def test_prune_mode_writes_a_dense_run_and_repair_lowers_the_calibration_loss(llm, pruned):
  workdir, result = pruned
  loss = result["calibration_loss"]
  # pruning costs loss, and the least-squares repair wins some back against the same pruning
  # without it (its norms matched alike)
  assert loss["source"] < loss["pruned"] < loss["norms_matched"], loss
  assert loss["source"] < loss["sliced"], loss
  saved = saved_run.load_saved(workdir)
  assert saved.step == 40 and saved.config.init_from == llm
  assert (saved.model.d_model, saved.model.n_heads, saved.model.mlp_dim) == (64, 2, 256)
  assert saved.root.workdir == llm  # tokenizer and clusters: the LLM's pretraining run
  with open(os.path.join(workdir, "prune.json")) as f:
    assert json.load(f)["generic_valid_ppl"] == pytest.approx(result["generic_valid_ppl"])
  assert result["params"] < result["source_params"] and result["flops"] > 0
  # eval of the pruned run (the same eval batches) reproduces the generic ppl it reported
  got = modes.MODES["eval"](load_config("prune"), workdir)
  assert got["perplexity"] == pytest.approx(result["generic_valid_ppl"], rel=1e-5)


def test_a_pruned_run_specializes_samples_and_exports(pruned, tmp_path):
  workdir, _ = pruned
  config = quiet(load_config("finetune"), steps=4, eval_every=2)
  config.init_from, config.data.domain = workdir, "legal"
  result = modes.MODES["specialize"](config, str(tmp_path / "legal"))
  assert result["pretrained_kind"] == "dense" and np.isfinite(result["test_ppl"])
  sample = load_config("finetune")
  sample.sample.update(prompt="The", max_new_tokens=4)
  assert modes.MODES["sample"](sample, str(tmp_path / "legal"))["samples"]
  export = load_config("finetune")
  out = modes.MODES["export"](export, workdir)
  assert os.path.exists(out["export_dir"])


def test_rerunning_a_finished_pruning_returns_it_and_other_settings_are_refused(llm, pruned):
  workdir, result = pruned
  config = load_config("prune")
  config.init_from = llm
  assert modes.MODES["prune"](config, workdir)["seconds"] == result["seconds"]
  config.prune.mlp_dim = 128
  with pytest.raises(ConfigError, match="mlp_dim: 256 -> 128"):
    modes.MODES["prune"](config, workdir)
  config.prune.mlp_dim = 256
  with pytest.raises(ConfigError, match="lies inside config.init_from"):
    modes.MODES["prune"](config, os.path.join(llm, "pruned"))


def test_a_pruning_cut_short_after_its_save_is_redone_and_other_runs_are_kept(llm, pruned,
                                                                              tmp_path):
  """Checkpoints without prune.json: this pruning's are written again; a workdir holding
  another run's checkpoints (here the LLM's own copy) is refused and left as it was."""
  import shutil
  workdir, result = pruned
  cut = str(tmp_path / "cut")
  shutil.copytree(workdir, cut)
  os.remove(os.path.join(cut, "prune.json"))
  config = load_config("prune")
  config.init_from = llm
  again = modes.MODES["prune"](config, cut)
  assert again["calibration_loss"] == result["calibration_loss"]
  other = str(tmp_path / "other")
  shutil.copytree(llm, other)
  before = snapshot(other)
  with pytest.raises(ConfigError, match="holds checkpoints that are not this pruning's"):
    modes.MODES["prune"](config, other)
  assert snapshot(other) == before
