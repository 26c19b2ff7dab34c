"""The `:arg` of a config file (`configs/pn.py:tiny,k=8`): what each file accepts, nothing else.

Config files used to accept any word: `configs/pn.py:tny` silently built the full 1.4B-parameter
model. Each file under configs/ now declares `ARGS = Accepts(...)`: bare words (a size such as
"tiny", an experiment part) and typed `key=value` pairs. `ARGS.parse(arg, __file__)` refuses
anything else, and a value that does not parse, with a ConfigError naming the bad word and the
accepted ones, before any model is built.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from pn_jax.config import ARCHS, ConfigError


@dataclasses.dataclass(frozen=True)
class Value:
  """A key's value type: `name` is shown in messages (k=<int>); `parse` turns the text into the
  value (raising ValueError when it cannot); `example` is a text it accepts (tests load it)."""
  name: str
  parse: Callable[[str], object]
  example: str


def _integral(text: str) -> int:
  """'1e6' -> 1000000: token counts read better in scientific notation; 1.5 is refused."""
  value = float(text)
  if not value.is_integer():
    raise ValueError(f"{text!r} is not a whole number")
  return int(value)


def _flag(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise ValueError(f"{text!r} is not 0 or 1")


def _nonempty(text: str) -> str:
  if not text:
    raise ValueError("empty value")
  return text


INT = Value("<int>", int, "2")
NUMBER = Value("<number>", _integral, "1e3")  # an integer, scientific notation allowed
FLAG = Value("<0|1>", _flag, "1")
TEXT = Value("<text>", _nonempty, "x")


def one_of(*choices: str) -> Value:
  def parse(text: str) -> str:
    if text not in choices:
      raise ValueError(f"{text!r} is not one of {choices}")
    return text
  return Value("|".join(choices), parse, choices[0])


def int_list(sep: str = "/") -> Value:
  return Value(f"<int>{sep}<int>...", lambda text: [int(x) for x in text.split(sep)],
               f"2{sep}4")


ARCH = one_of(*ARCHS)  # `arch=llama` on the model config files: pn_jax.config.use_arch


@dataclasses.dataclass(frozen=True)
class Accepts:
  """What a config file takes after its `:`: any of `words` (each at most once) and `keys`."""
  words: tuple[str, ...] = ()
  keys: dict[str, Value] = dataclasses.field(default_factory=dict)

  def describe(self) -> str:
    return ", ".join([*self.words, *(f"{k}={v.name}" for k, v in self.keys.items())])

  def parse(self, arg: str | None, where: str) -> dict:
    """'tiny,k=8' -> {'tiny': True, 'k': 8}; `where` is the file (its `__file__`)."""
    where = _shown(where)
    args: dict = {}
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
      key, sep, text = (s.strip() for s in part.partition("="))
      if not self.words and not self.keys:
        raise ConfigError(f"{where}: takes no argument, got {arg!r}; use the file alone")
      if key in args:
        raise ConfigError(f"{where}: argument {key!r} given twice in {arg!r}")
      if sep and key in self.keys:
        try:
          args[key] = self.keys[key].parse(text)
        except ValueError as e:
          raise ConfigError(f"{where}: argument {part!r}: expected {key}={self.keys[key].name} "
                            f"({e})") from None
      elif not sep and key in self.words:
        args[key] = True
      else:
        raise ConfigError(f"{where}: unknown argument {part!r}; accepted: {self.describe()}")
    return args


NONE = Accepts()  # a file that takes no argument


def _shown(path: str) -> str:
  """The file as the user likely typed it: relative to the working directory when inside it."""
  path = str(path)
  rel = os.path.relpath(path) if os.path.isabs(path) else path
  return path if rel.startswith("..") else rel
