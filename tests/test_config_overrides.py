"""The one `a.b=value` override parser (experiment methods, bench.sweep, sweep points)."""

import pytest

from conftest import load_config
from pn_jax import config_overrides
from pn_jax.config import ConfigError


def test_text_is_cast_to_each_keys_type():
  config = load_config("pn")
  config_overrides.apply(config, "model.h=6, optim.lr=5e-3,optim.decay_codes=false,"
                                 "data.cluster_batching='stratified',model.activation=relu")
  assert (config.model.h, config.optim.lr, config.optim.decay_codes) == (6, 5e-3, False)
  assert (config.data.cluster_batching, config.model.activation) == ("stratified", "relu")
  assert type(config.model.h) is int and type(config.optim.lr) is float


def test_typed_values_must_fit_the_key():
  config = load_config("pn")
  config_overrides.apply(config, [("optim.lr", 1), ("model.h", 8)])  # an int fits a float key
  assert config.optim.lr == 1.0 and type(config.optim.lr) is float and config.model.h == 8
  config_overrides.apply(config, [("model.h", "4")])  # text is cast, a typed value is not
  assert config.model.h == 4
  with pytest.raises(ConfigError, match=r"sweep point x: override 'model.h=8.5': model.h takes "
                     r"int values \(it is 4\), not 8.5"):
    config_overrides.apply(config, [("model.h", 8.5)], "sweep point x: ")
  with pytest.raises(ConfigError, match=r"model.k takes int values \(it is \d+\), not 'four'"):
    config_overrides.apply(config, "model.k=four")


def test_unknown_keys_name_the_closest_and_nothing_else_changes():
  config = load_config("pn")
  with pytest.raises(ConfigError, match=r"bench.sweep: override 'model.hh=4': unknown config "
                     r"key 'model.hh'; did you mean h\?"):
    config_overrides.applied(config, "model.hh=4", "bench.sweep: ")
  with pytest.raises(ConfigError, match=r"unknown config key 'model.h.x'"):
    config_overrides.apply(config, "model.h.x=1")
  with pytest.raises(ConfigError, match="override 'model.h': expected key=value"):
    config_overrides.parse("model.h")
  copy = config_overrides.applied(config, "model.h=2")
  assert copy.model.h == 2 and config.model.h != 2
