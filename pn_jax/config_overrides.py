"""`a.b=value` overrides of a run config: the one parser behind an experiment's method specs,
the bench's `bench.sweep` and the sweep driver's points.

A value is set at the key's own type: text is cast (`model.h=6` is an int, `optim.lr=5e-3` a
float, `true` / `false` a bool, `mixed` or `'mixed'` a string, a tuple or list as a Python
literal), and a typed value (a sweep definition's) must fit the key's type (an int where a
float is). An unknown key or a value of the wrong type is a ConfigError naming the override,
with the closest keys.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable

import ml_collections

from pn_jax.config import ConfigError


def parse(text: str) -> list[tuple[str, str]]:
  """'a.b=1,c=x' -> [('a.b', '1'), ('c', 'x')] (blank items skipped)."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r}: expected key=value")
    out.append((key.strip(), value.strip()))
  return out


def apply(config: ml_collections.ConfigDict, overrides: str | Iterable[tuple[str, Any]],
          where: str = "") -> None:
  """Sets each (key, value) of `overrides` (or of the text `parse` reads) in `config`, in place;
  `where` prefixes the errors (e.g. 'sweep point h=8: ')."""
  items = parse(overrides) if isinstance(overrides, str) else overrides
  for key, value in items:
    _set(config, key, value, where)


def applied(config: ml_collections.ConfigDict, overrides, where: str = ""
            ) -> ml_collections.ConfigDict:
  """A copy of `config` (unlocked) with `overrides` set; `config` is untouched."""
  out = ml_collections.ConfigDict(config.to_dict())
  apply(out, overrides, where)
  return out


def _set(config: ml_collections.ConfigDict, key: str, value, where: str) -> None:
  item = f"{key}={value}" if isinstance(value, str) else f"{key}={value!r}"
  *parents, leaf = key.split(".")
  parent, node = None, config
  for part in [*parents, leaf]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, keys, n=3)
      hint = f"did you mean {' or '.join(close)}?" if close else "fix the key"
      raise ConfigError(f"{where}override {item!r}: unknown config key {key!r}; {hint}")
    parent, node = node, node[part]
  try:
    parent[leaf] = _typed(node, value) if isinstance(value, str) else _checked(node, value)
  except (TypeError, ValueError, SyntaxError) as e:
    raise ConfigError(f"{where}override {item!r}: {key} takes {type(node).__name__} values "
                      f"(it is {node!r}), not {value!r}") from e


def _typed(current, text: str):
  """`text` read as a value of `current`'s type."""
  kind = type(current)
  if kind is bool:  # bool("False") is True
    if text.lower() not in ("true", "false"):
      raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"
  if kind in (int, float):
    return kind(text)
  if kind is str:
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    return ast.literal_eval(text) if quoted else text
  return _checked(current, ast.literal_eval(text))  # tuples, lists, dicts, None


def _checked(current, value):
  """`value` if it fits `current`'s type (ints fit floats; a tuple key takes a list too)."""
  if current is None or value is None or isinstance(value, type(current)):
    return value
  if isinstance(current, float) and type(value) is int:
    return float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(current)(value)
  raise TypeError(f"{value!r} is not a {type(current).__name__}")
