"""ModelConfig: every shipped config's model round-trips through it, old checkpoints' configs
still load, and a model holding one is hashable, so jit takes it as a static argument."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import CONFIG_SCRIPTS, REPO, load_config
from pn_jax.config import ConfigError, load_config as load_spec
from pn_jax.model import build_model
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.independent_experts import IndependentLM
from pn_jax.model.transformer import LM, init_params

CONFIG_FILES = sorted(set(
    str(p.relative_to(REPO)) for folder in ("configs", "configs/bench")
    for p in (REPO / folder).glob("*.py")) - set(CONFIG_SCRIPTS))


def _models(path):
  """configs/<file>.py's model section for each argument the file accepts ("" and "tiny")."""
  out = []
  for arg in ("", "tiny"):
    try:
      out.append(load_spec(f"{REPO / path}:{arg}").model)
    except ConfigError:  # e.g. quickstart has no `tiny` (it is tiny already)
      assert arg, f"{path} refuses its default config"
  return out


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_shipped_model_config_round_trips(path):
  for model in _models(path):
    cfg = ModelConfig.from_config(model)
    assert cfg.to_dict() == model.to_dict()
    assert list(cfg.to_dict()) == list(model.to_dict())  # the same JSON (key order)
    assert ModelConfig.from_config(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig.from_config(cfg) is cfg
    assert hash(cfg) == hash(ModelConfig.from_config(model.to_dict()))


def test_old_checkpoint_configs_get_the_values_those_runs_used():
  old = load_config("pn").model.to_dict()
  del old["code_init"], old["independent_experts"]  # saved before these keys existed
  cfg = ModelConfig.from_config(old)
  assert cfg.code_init == "random" and cfg.independent_experts is False
  with pytest.raises(ConfigError, match=r"missing \['d_model'\], unknown \['d_modle'\]"):
    ModelConfig.from_config({**{k: v for k, v in old.items() if k != "d_model"}, "d_modle": 64})


def test_models_are_hashable_and_static_jit_arguments():
  pn = load_config("pn").model
  a, b = build_model(pn), build_model(ModelConfig.from_config(pn))
  assert isinstance(a, LM) and a is not b and a == b and hash(a) == hash(b)
  mix = build_model(load_config("mix").model)
  assert isinstance(mix, IndependentLM) and hash(mix) == hash(build_model(load_config("mix").model))
  traces = []

  def logits(params, tokens_BT, model):
    traces.append(model)
    return model.apply({"params": params}, tokens_BT, jnp.zeros((2,), jnp.int32))

  fn = jax.jit(logits, static_argnames="model")
  params = nn.unbox(init_params(a, jax.random.key(0)))
  tokens_BT = jnp.zeros((2, 8), jnp.int32)
  first = fn(params, tokens_BT, model=a)
  second = fn(params, tokens_BT, model=b)  # an equal model: the compiled function is reused
  assert len(traces) == 1
  assert (first == second).all()
