"""Export: safetensors + JSON config reload into a model with exactly the checkpoint's logits."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import load_config
from pn_jax import modes, safetensors_io
from pn_jax.config import ConfigError
from pn_jax.model import build_model
from pn_jax.model.transformer import init_params
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import create_state

TOKENS = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)


def _logits(model, params, cluster=None):
  c = None if cluster is None else jnp.full((TOKENS.shape[0],), cluster, jnp.int32)
  return np.asarray(jax.jit(model.apply)({"params": params}, TOKENS, c))


def test_save_load_round_trip_is_exact(tmp_path):
  cfg = load_config("slm").model
  model = build_model(cfg)
  params = nn.unbox(init_params(model, jax.random.key(3)))
  out = safetensors_io.save(str(tmp_path / "exp"), params, cfg, metadata={"domain": "legal"})
  tensors = load_file(os.path.join(out, safetensors_io.WEIGHTS))
  assert "blocks.attn.wq" in tensors and tensors["blocks.mlp.w_in"].shape == (2, 64, 256)
  with open(os.path.join(out, safetensors_io.CONFIG)) as f:
    assert json.load(f)["domain"] == "legal"
  model2, params2, info = safetensors_io.load(out)
  assert info["model"]["d_model"] == cfg.d_model
  np.testing.assert_array_equal(_logits(model2, params2), _logits(model, params))


@pytest.fixture(scope="module")
def pn_checkpoint(tmp_path_factory):
  """A PN checkpoint written by the training code's Checkpointer (no data needed)."""
  workdir = str(tmp_path_factory.mktemp("pn_ckpt"))
  config = load_config("pn")
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh, rules = mesh_lib.make_mesh(config, jax.devices()[:1]), mesh_lib.logical_rules(config)
  tx, _ = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(build_model(config.model), tx, mesh, rules, jax.random.key(5))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(7, state, config, force=True)
    ckpt.close()
  config.mesh.data = -1  # the export mode runs on all (8 fake) devices
  return workdir, config, jax.device_get(state.params)


def test_export_mode_projects_a_pn_checkpoint(pn_checkpoint):
  workdir, config, pn_params = pn_checkpoint
  config = config.copy_and_resolve_references()
  config.sample.cluster = 2
  result = modes.MODES["export"](config, workdir)
  assert result["step"] == 7 and result["cluster"] == 2
  model, params, info = safetensors_io.load(result["export_dir"])
  assert info["model"]["mlp_kind"] == "dense" and "T_in" not in params["blocks"]["mlp"]
  want = _logits(build_model(config.model), pn_params, cluster=2)
  np.testing.assert_allclose(_logits(model, params), want, atol=2e-5, rtol=2e-5)


def test_export_refuses_bad_input(pn_checkpoint, tmp_path):
  workdir, config, _ = pn_checkpoint
  with pytest.raises(ConfigError, match="sample.cluster"):
    modes.MODES["export"](config, workdir)  # a PN needs an expert to export
  with pytest.raises(CheckpointError, match="holds no checkpoint .*run --mode=specialize"):
    modes.MODES["export"](config, str(tmp_path / "empty"))
