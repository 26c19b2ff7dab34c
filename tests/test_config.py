"""Config validation turns bad h/k/m, shapes and meshes into errors that name the key."""

import pytest

from conftest import load_config
from pn_jax.config import ConfigError, mesh_shape, validate


@pytest.mark.parametrize("name", ["slm", "llm", "mix", "mix_shared", "pn", "quickstart"])
def test_shipped_configs_validate(name):
  for arg in ("",) if name == "quickstart" else ("", "tiny"):  # quickstart is tiny already (no `tiny`)
    cfg = load_config(name, arg)
    validate(cfg, device_count=8)


def test_pn_and_mix_share_k_and_small_model_size():
  pn, mix, slm = load_config("pn", ""), load_config("mix", ""), load_config("slm", "")
  for key in ("d_model", "n_layers", "n_heads", "mlp_dim", "vocab_size"):
    assert pn.model[key] == slm.model[key] == mix.model[key]
  for arg in ("tiny", "tiny,k=8"):
    assert load_config("pn", arg).model.k == load_config("mix", arg).model.k


@pytest.mark.parametrize("change,match", [
    (dict(m=9, h=8), r"model\.m.*exceeds basis size h=8"),
    (dict(k=0), r"model\.k.*>= 1"),
    (dict(n_heads=5), r"model\.n_heads.*do not divide d_model=64"),
    (dict(mlp_kind="moe"), r"model\.mlp_kind.*unknown kind"),
    (dict(remat="sometimes"), r"model\.remat"),
    (dict(d_model=0), r"model\.d_model.*positive integer"),
    (dict(code_init="orthogonal"), r"model\.code_init.*unknown code init 'orthogonal'"),
])
def test_model_errors(change, match):
  cfg = load_config("pn")
  cfg.model.update(change)
  with pytest.raises(ConfigError, match=match):
    validate(cfg)


def test_mesh_errors():
  cfg = load_config("pn")
  cfg.mesh.update(data=2, fsdp=2, tensor=1)
  with pytest.raises(ConfigError, match=r"uses 4 devices but 8 are available"):
    validate(cfg, device_count=8)
  cfg.mesh.update(data=-1, fsdp=3)
  with pytest.raises(ConfigError, match=r"do not divide the 8 available devices"):
    validate(cfg, device_count=8)
  cfg.mesh.update(data=-1, fsdp=-1)
  with pytest.raises(ConfigError, match=r"at most one mesh axis may be -1"):
    validate(cfg, device_count=8)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  assert mesh_shape(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_batch_and_sequence_errors():
  cfg = load_config("pn")
  cfg.data.batch_size = 6
  with pytest.raises(ConfigError, match=r"data\.batch_size.*not divisible.*8"):
    validate(cfg, device_count=8)
  cfg = load_config("pn")
  cfg.data.seq_len = 4096
  with pytest.raises(ConfigError, match=r"data\.seq_len.*exceeds model\.max_len"):
    validate(cfg)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name,key,value", [
    ("pn", "optim.lr", NAN), ("pn", "optim.lr", INF), ("pn", "optim.lr", -INF),
    ("pn", "optim.clip_norm", NAN), ("pn", "optim.weight_decay", INF), ("pn", "optim.b2", NAN),
    ("pn", "optim.basis_lr_scale", INF), ("pn", "train.checkpoint_every_minutes", NAN),
    ("finetune", "optim.lr", NAN), ("finetune", "distill.temperature", INF),
])
def test_non_finite_numbers_are_refused_naming_the_key(name, key, value):
  """Issue 25, item 8: optim.lr=nan passed validation (nan fails no `<` check) and the run
  diverged at step 2; every float key refuses nan and inf up front."""
  cfg = load_config(name)
  section, leaf = key.split(".")
  cfg[section][leaf] = value
  with pytest.raises(ConfigError, match=rf"^config\.{key}: must be a finite number, got "
                                        rf"{value}$"):
    validate(cfg)
