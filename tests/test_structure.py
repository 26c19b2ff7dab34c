"""Structural rules of pn_jax/, read from the sources with ast (imports nothing of pn_jax: fast).

1. No function or method longer than MAX_LINES lines (decorators and docstring included), so
   every function can be read on one screen.
2. A `_private` name of one pn_jax module is used only inside that module: not imported
   (`from pn_jax.x import _y`), not reached through a module (`x_lib._y`, `setattr(x_lib, "_y")`,
   `"pn_jax.x._y"`) from another pn_jax module or from tests. Dunder names are public;
   `self._x` / `cls._x` are attributes, not module names.
3. No import cycles between pn_jax modules. Imports inside functions count too (a cycle deferred
   to call time is still one). `from pn_jax.a import b` is an edge to the module pn_jax.a.b when
   that exists, else to the package pn_jax.a; the package __init__ that Python runs implicitly
   before any pn_jax.a.* is not an edge (the explicit imports of a package are).
4. No upward imports: each module sits in one layer of LAYERS and imports only from its own
   layer or lower ones (LAYER_EXCEPTIONS: the few functions allowed to, each with its reason).
   Every module must be listed, so a new module is placed deliberately.
5. No two modules whose file names are equal (in different packages) or one letter apart:
   `specialize/checkpoints.py` next to `train/checkpoint.py` sent readers to the wrong one.

Each check lists every offender as `path:line what`, one per line.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 60

# Lower number = lower layer. A module may import from its own layer and below, never above.
# A module's layer is that of its own name, else of its longest listed package prefix.
LAYERS = {
    "pn_jax": 0,  # the package __init__ (empty)
    # 1: the config schema, the `:arg` parser of config files, the `a.b=value` override parser
    # (config_overrides.py: experiment methods, bench.sweep, sweep points), the error path of every
    # command line (cli.py: UsageError, entry, parse_flags; see LAYER_EXCEPTIONS) and its log
    # policy (log_setup.py).
    "pn_jax.config": 1,
    "pn_jax.config_args": 1,
    "pn_jax.config_overrides": 1,
    "pn_jax.cli": 1,
    "pn_jax.log_setup": 1,  # the log policy every absl command line installs (cli.parse_flags)
    "pn_jax.storage": 1,  # a full disk as one error line (OutOfSpace), for every layer's writes
    # 2: the libraries training is made of (model/model_config.py's ModelConfig included; the
    # data package also writes its tokenizer for transformers: data/hf_tokenizer.py).
    "pn_jax.parallel": 2,
    "pn_jax.model": 2,
    "pn_jax.data": 2,
    # 3: training, and what a training run is opened on: the run context (run.py: config,
    # mesh, model, data; train/loop.py takes it), saved runs (saved_run.py: a checkpoint and its
    # init_from chain), the workdir lock (train/loop.py takes it). train/compile.py included.
    "pn_jax.train": 3,
    "pn_jax.run": 3,
    "pn_jax.saved_run": 3,
    "pn_jax.workdir_lock": 3,
    # 4: libraries over a trained network: projection, expert selection, distillation,
    # importance sampling (specialize/*), the sampler, safetensors files (safetensors_io.py:
    # pn-jax's export layout; hf_export.py: a transformers directory, Arcee or Llama).
    "pn_jax.specialize": 4,
    "pn_jax.generate": 4,
    "pn_jax.safetensors_io": 4,
    "pn_jax.hf_export": 4,
    # 5: the user journeys: one entry function per mode (modes/*.py), the table in
    # modes/__init__.py.
    "pn_jax.modes": 5,
    # 6: commands that run several journeys or time them: experiments, sweeps, the benchmark.
    "pn_jax.experiment": 6,
    "pn_jax.experiment_report": 6,
    "pn_jax.experiment_figures": 6,  # the report's figures, drawn from its tables' cells
    "pn_jax.sweep": 6,
    "pn_jax.sweep_results": 6,
    "pn_jax.sweep_parts": 6,  # a sweep's points as parts of the comparison experiment
    "pn_jax.sweep_scores": 6,  # their table and figure, scored by the specialized model
    "pn_jax.bench": 6,
    "pn_jax.step_costs": 6,  # a step timed by the bench, for the experiment's fitted runs
    "pn_jax.aot": 6,  # the train step compiled for a TPU topology ahead of time
    # 7: the main command lines.
    "pn_jax.main": 7,
    "pn_jax.data.__main__": 7,  # `python -m pn_jax.data`: prepare / stats / report
}

# Upward imports allowed inside one function, each with its reason: (module, function) -> why.
LAYER_EXCEPTIONS = {
    ("pn_jax.cli", "user_error_types"):
        "the one list of exceptions that mean bad input (exit 2) names the error types of every "
        "layer; imported on the error path only, so `python -m pn_jax.data` never loads jax",
    ("pn_jax.cli", "parse_flags"):
        "every command line leaves the TPU out of jax's platforms where none is attached "
        "(parallel/platforms.py), after its flags and before any backend starts: parse_flags is "
        "the one step they all pass",
}


@dataclasses.dataclass(frozen=True)
class Module:
  name: str  # dotted, e.g. pn_jax.data.pipeline (pn_jax.data for data/__init__.py)
  path: pathlib.Path
  tree: ast.Module

  @property
  def rel(self) -> str:
    return str(self.path.relative_to(REPO))

  @property
  def package(self) -> str:
    """The package that relative imports in this module are resolved against."""
    return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _parse(path: pathlib.Path, name: str) -> Module:
  return Module(name, path, ast.parse(path.read_text(), filename=str(path)))


@functools.cache
def pn_modules() -> dict[str, Module]:
  out = {}
  for path in sorted((REPO / "pn_jax").rglob("*.py")):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = _parse(path, ".".join(parts))
  return out


@functools.cache
def sources_of_tests() -> list[Module]:
  """tests/*.py but this file (whose planted offenders below are deliberate)."""
  return [_parse(p, f"tests.{p.stem}") for p in sorted((REPO / "tests").glob("*.py"))
          if p.name != pathlib.Path(__file__).name]


@dataclasses.dataclass(frozen=True)
class Import:
  line: int
  target: str  # the pn_jax module imported
  name: str | None  # for `from target import name` where name is not a module itself
  alias: str  # the local name bound ("pn_jax" for a plain `import pn_jax.x.y`)
  scope: str  # the enclosing function's qualified name; "" at module or class level


def _import_targets(module: Module, node: ast.Import | ast.ImportFrom):
  """(target module, name or None, alias) of each pn_jax module one import statement names."""
  known = pn_modules()
  if isinstance(node, ast.Import):
    for a in node.names:
      if a.name in known:
        yield a.name, None, a.asname or a.name.split(".")[0]
    return
  base = node.module or ""
  if node.level:
    pkg = module.package.split(".")
    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
  if base.split(".")[0] != "pn_jax":
    return
  for a in node.names:
    sub = f"{base}.{a.name}"
    yield (sub, None, a.asname or a.name) if sub in known else (base, a.name,
                                                                a.asname or a.name)


def imports(module: Module) -> list[Import]:
  """Every import of a pn_jax module in `module`, at module level and inside functions."""
  out = []

  def visit(node, scope, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import | ast.ImportFrom):
        out.extend(Import(child.lineno, t, n, a, scope)
                   for t, n, a in _import_targets(module, child))
      elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
        visit(child, f"{prefix}{child.name}", f"{prefix}{child.name}.")
      elif isinstance(child, ast.ClassDef):
        visit(child, scope, f"{prefix}{child.name}.")
      else:
        visit(child, scope, prefix)

  visit(module.tree, "", "")
  return out


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
  """`a.b.c` as ['a', 'b', 'c']; None for anything but a chain of names."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id, *reversed(parts)]


def _module_of(expr: ast.expr, aliases: dict[str, str]) -> str | None:
  """The pn_jax module an expression names (`pipeline`, `pn_jax.data.pipeline`), else None."""
  parts = _dotted(expr)
  if not parts or parts[0] not in aliases:
    return None
  name = ".".join([aliases[parts[0]], *parts[1:]])
  return name if name in pn_modules() else None


def _loop_constants(node: ast.AST, var: str, parents: dict) -> list[str]:
  """The string constants `var` takes in an enclosing `for var in ("_a", "_b")`."""
  while node in parents:
    node = parents[node]
    if (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == var
        and isinstance(node.iter, (ast.Tuple, ast.List))):
      return [e.value for e in node.iter.elts if isinstance(e, ast.Constant)
              and isinstance(e.value, str)]
  return []


def private_uses(module: Module) -> list[str]:
  """`path:line module._name` for each private name of another pn_jax module used here."""
  own = module.name
  found = []
  imps = imports(module)
  # `import pn_jax.data.pipeline` binds `pn_jax`: the chain after it names the module.
  aliases = {i.alias: "pn_jax" if i.alias == "pn_jax" else i.target
             for i in imps if i.name is None}

  def report(line, target, name):
    if target != own and _is_private(name):
      found.append(f"{module.rel}:{line} {target}.{name}")

  for i in imps:
    if i.name is not None:
      report(i.line, i.target, i.name)
  parents = {c: p for p in ast.walk(module.tree) for c in ast.iter_child_nodes(p)}
  for node in ast.walk(module.tree):
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load | ast.Store | ast.Del):
      target = _module_of(node.value, aliases)
      if target:
        report(node.lineno, target, node.attr)
    elif (isinstance(node, ast.Call) and len(node.args) >= 2
          and (_dotted(node.func) or [""])[-1] in ("setattr", "getattr", "hasattr", "delattr")):
      target = _module_of(node.args[0], aliases)
      arg = node.args[1]
      if not target:
        continue
      if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        report(node.lineno, target, arg.value)
      elif isinstance(arg, ast.Name):
        for name in _loop_constants(node, arg.id, parents):
          report(node.lineno, target, name)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      head, _, last = node.value.rpartition(".")
      if head in pn_modules():  # monkeypatch.setattr("pn_jax.x._y", ...)
        report(node.lineno, head, last)
  return sorted(set(found), key=lambda s: (s.split(":")[0], int(s.split(":")[1].split()[0]), s))


def long_functions(module: Module) -> list[str]:
  found = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        qual = f"{prefix}{child.name}"
        if not isinstance(child, ast.ClassDef):
          start = min([child.lineno] + [d.lineno for d in child.decorator_list])
          n = child.end_lineno - start + 1
          if n > MAX_LINES:
            found.append(f"{module.rel}:{start} {qual} ({n} lines)")
        visit(child, f"{qual}.")
      else:
        visit(child, prefix)

  visit(module.tree, "")
  return found


def import_graph() -> dict[str, dict[str, int]]:
  """module -> {imported module: first line}, pn_jax modules only, self-imports left out."""
  graph = {}
  for name, module in pn_modules().items():
    edges = graph.setdefault(name, {})
    for i in imports(module):
      if i.target != name:
        edges.setdefault(i.target, i.line)
  return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def layer(name: str) -> int | None:
  """The layer of a module: its own entry, else its longest listed package's (not "pn_jax":
  the root's entry is the package __init__ alone, so an unlisted module has no layer)."""
  parts = name.split(".")
  for n in range(len(parts), 1, -1):
    if ".".join(parts[:n]) in LAYERS:
      return LAYERS[".".join(parts[:n])]
  return LAYERS.get(name)


def _fail(title: str, offenders: list[str]):
  assert not offenders, f"{title} ({len(offenders)}):\n" + "\n".join(offenders)


def test_no_long_functions():
  found = [f for m in pn_modules().values() for f in long_functions(m)]
  _fail(f"functions longer than {MAX_LINES} lines", found)


def test_private_names_stay_in_their_module():
  found = [f for m in [*pn_modules().values(), *sources_of_tests()] for f in private_uses(m)]
  _fail("private names used outside their module", found)


def test_no_import_cycles():
  graph, modules = import_graph(), pn_modules()
  found = []
  for comp in cycles(graph):
    found.append("cycle: " + " <-> ".join(comp))
    for a in comp:
      for b, line in sorted(graph[a].items()):
        if b in comp:
          found.append(f"  {modules[a].rel}:{line} imports {b}")
  _fail("import cycles between pn_jax modules", found)


def test_every_module_has_a_layer():
  _fail("modules missing from LAYERS", [f"{m.rel}: {m.name}" for m in pn_modules().values()
                                        if layer(m.name) is None])


def upward_imports(module: Module) -> list[str]:
  found = []
  for i in imports(module):
    la, lb = layer(module.name), layer(i.target)
    if (la is not None and lb is not None and lb > la
        and (module.name, i.scope.split(".")[0]) not in LAYER_EXCEPTIONS):
      found.append(f"{module.rel}:{i.line} {module.name} (layer {la}) imports {i.target} "
                   f"(layer {lb})")
  return found


def test_no_upward_imports():
  _fail("upward imports", [f for m in pn_modules().values() for f in upward_imports(m)])


def _one_edit_apart(a: str, b: str) -> bool:
  """Equal, or one letter inserted, deleted or changed."""
  if abs(len(a) - len(b)) > 1:
    return False
  i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  return a[i + 1:] == b[i + 1:] or a[i:] == b[i + 1:] or a[i + 1:] == b[i:]


def near_duplicate_names(paths: list[pathlib.Path]) -> list[str]:
  """Pairs of modules whose file names are equal or one letter apart (a plural "s", a typo);
  package __init__/__main__ aside."""
  named = sorted((p.stem, str(p.relative_to(REPO))) for p in paths
                 if p.stem not in ("__init__", "__main__"))
  return [f"{pa} vs {pb}" for i, (a, pa) in enumerate(named) for b, pb in named[i + 1:]
          if _one_edit_apart(a, b)]


def test_no_two_modules_named_alike():
  _fail("modules named alike", near_duplicate_names(sorted((REPO / "pn_jax").rglob("*.py"))))


def test_the_checks_find_what_they_look_for():
  """The checks above are only as good as their parsing: each finds a planted offender."""
  src = ("from pn_jax.data import pipeline\nfrom pn_jax.data.pipeline import _build\n"
         "import pn_jax.data.cache as cache_lib\n"
         "def f(self):\n  self._ok; pipeline.__name__\n  pipeline._batches()\n"
         "  for n in ('_pack', 'ok'):\n    setattr(pipeline, n, None)\n"
         "  getattr(cache_lib, '_key'); x = 'pn_jax.data.corpus._clean'\n" + "  pass\n" * 60)
  fake = Module("tests.fake", REPO / "tests" / "fake.py", ast.parse(src))
  assert [u.split(" ", 1)[1] for u in private_uses(fake)] == [
      "pn_jax.data.pipeline._build", "pn_jax.data.pipeline._batches",
      "pn_jax.data.pipeline._pack", "pn_jax.data.cache._key", "pn_jax.data.corpus._clean"]
  assert long_functions(fake) == ["tests/fake.py:4 f (66 lines)"]
  assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
  assert layer("pn_jax.data.pipeline") == 2 and layer("pn_jax.data.__main__") == 7
  assert layer("pn_jax") == 0 and layer("pn_jax.new_module") is None
  config = Module("pn_jax.config", REPO / "pn_jax" / "config.py",
                  ast.parse("def f():\n  from pn_jax import modes\n"))
  assert upward_imports(config) == [
      "pn_jax/config.py:2 pn_jax.config (layer 1) imports pn_jax.modes (layer 5)"]
  assert sorted(near_duplicate_names(
      [REPO / "a/checkpoints.py", REPO / "b/checkpoint.py", REPO / "config.py",
       REPO / "m/config.py", REPO / "d/__init__.py", REPO / "m/__init__.py", REPO / "run.py",
       REPO / "ran.py", REPO / "loss.py", REPO / "loop.py"])) == [
      "b/checkpoint.py vs a/checkpoints.py", "config.py vs m/config.py", "ran.py vs run.py"]
