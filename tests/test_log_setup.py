"""Quiet logs by default (pn_jax/log_setup.py): a run shows pn-jax's own INFO lines, anyone's
warnings, the progress bar and the result, not the hundreds of INFO lines of orbax and JAX;
--log_level=info (or an explicit -v) brings those back; a log line never lands on the bar's
line."""

import fnmatch
import importlib.util
import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
from tqdm import tqdm

from conftest import REPO, copy_workdir
from pn_jax import log_setup
from pn_jax.parallel import platforms, xla_flags

PN_JAX = REPO / "pn_jax"
ORBAX_FILE = "/site-packages/orbax/checkpoint/_src/metadata/checkpoint.py"
ORBAX_MANAGER = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
ABSL_LINE = re.compile(r"([DIWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):(\d+)\] (.*)")


def record(level=logging.INFO, pathname=str(PN_JAX / "train" / "loop.py"), name="absl"):
  return logging.LogRecord(name, level, pathname, 1, "message", None, None)


# --- the filter -------------------------------------------------------------------------------


@pytest.mark.parametrize("rec, shown", [
    (record(), True),  # pn-jax's own INFO through absl's logger
    (record(logging.DEBUG), True),  # (whether DEBUG is on at all is the level's business)
    (record(name="pn_jax.data"), True),  # a pn_jax.* Python logger
    (record(pathname=ORBAX_FILE), False),  # orbax's INFO through the same absl logger
    (record(name="jax._src.xla_bridge", pathname="/x/jax/_src/xla_bridge.py"), False),
    (record(logging.WARNING, pathname=ORBAX_FILE), True),  # anyone's warnings
    (record(logging.ERROR, name="jax._src.xla_bridge", pathname="/x/jax/_src/b.py"), True),
    (record(pathname=str(REPO / "pn_jax_extra" / "x.py")), False),  # not a prefix match
    (logging.LogRecord("absl", logging.WARNING, ORBAX_MANAGER, 1, "Given directory is read "
                       "only=%s", ("/w/checkpoints",), None), False),  # a NOTICE
    (logging.LogRecord("absl", logging.WARNING, str(PN_JAX / "x.py"), 1, "Given directory is "
                       "read only", None, None), True),  # pn-jax's own warning, whatever it says
])
def test_concise_filter(rec, shown):
  assert log_setup.ConciseFilter().filter(rec) is shown


def test_a_log_line_clears_the_bar_first(monkeypatch):
  """Through BarSafeHandler the line starts on a cleared line (after the bar's last \\r) and the
  bar is redrawn after it; the plain handler appends it to the bar's line."""
  for wrap, starts_clean in ((True, True), (False, False)):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    inner = logging.StreamHandler(err)
    handler = log_setup.BarSafeHandler(inner) if wrap else inner
    bar = tqdm(total=10, file=err, mininterval=0, desc="pretrain")
    bar.update(3)
    handler.handle(record())
    bar.close()
    line = next(x for x in err.getvalue().split("\n") if "message" in x)
    assert (line.split("\r")[-1] == "message") is starts_clean, repr(line)
    if wrap:
      after = err.getvalue().split("message\n", 1)[1]
      assert after.lstrip("\r").startswith("pretrain:  30%"), repr(after)  # redrawn


# --- the flags, in a small absl program (no jax: about a second each) ---------------------------

# Logs one record of each kind as its logger would (level check, then the handlers) and prints
# which were shown; app.run and cli.parse_flags as every pn-jax command line uses them.
PROGRAM = f"""
import logging, sys
from absl import app
from pn_jax import cli
def emit(name, level, pathname, tag):
  logger = logging.getLogger(name)
  if logger.isEnabledFor(level):
    logger.handle(logger.makeRecord(name, level, pathname, 1, tag, None, None))
def main(argv):
  emit("absl", logging.INFO, {str(PN_JAX / "train" / "loop.py")!r}, "OWN_INFO")
  emit("absl", logging.DEBUG, {str(PN_JAX / "train" / "loop.py")!r}, "OWN_DEBUG")
  emit("absl", logging.INFO, {ORBAX_FILE!r}, "ORBAX_INFO")
  emit("absl", logging.WARNING, {ORBAX_FILE!r}, "ORBAX_WARNING")
  emit("absl", logging.WARNING, {ORBAX_MANAGER!r}, "Given directory is read only=ORBAX_NOTICE")
  emit("jax._src.xla_bridge", logging.INFO, "/x/jax/_src/xla_bridge.py", "JAX_INFO")
app.run(main, flags_parser=cli.parse_flags)
"""
EVERYTHING_AT_INFO = {"OWN_INFO", "ORBAX_INFO", "ORBAX_WARNING", "ORBAX_NOTICE", "JAX_INFO"}


@pytest.mark.parametrize("argv, shown", [
    ([], {"OWN_INFO", "ORBAX_WARNING"}),
    (["--log_level=concise"], {"OWN_INFO", "ORBAX_WARNING"}),
    (["--log_level=info"], EVERYTHING_AT_INFO),
    (["--log_level=debug"], EVERYTHING_AT_INFO | {"OWN_DEBUG"}),
    (["--log_level=warning"], {"ORBAX_WARNING"}),
    (["-v", "0"], EVERYTHING_AT_INFO),  # absl's own verbosity, given: absl decides, unfiltered
    (["--verbosity=1"], EVERYTHING_AT_INFO | {"OWN_DEBUG"}),
    (["-v", "1", "--log_level=concise"], {"OWN_INFO", "ORBAX_WARNING"}),  # --log_level wins
])
def test_log_level_flag(argv, shown):
  out = subprocess.run([sys.executable, "-c", PROGRAM, *argv], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  tags = {"OWN_INFO", "OWN_DEBUG", "ORBAX_INFO", "ORBAX_WARNING", "ORBAX_NOTICE", "JAX_INFO"}
  assert {t for t in tags if t in out.stderr} == shown, out.stderr


def test_log_level_in_helpfull():
  out = subprocess.run([sys.executable, "-m", "pn_jax.main", "--helpfull"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert "--log_level: <concise|info|debug|warning>" in out.stdout, out.stdout[-3000:]


# --- a real run -------------------------------------------------------------------------------

# The quickstart, short: progress bar on, async checkpoints (orbax logs most then), an eval.
QUICK = ["--config=configs/quickstart.py", "--config.train.steps=6", "--config.train.log_every=2",
         "--config.train.checkpoint_every=3", "--config.train.eval_every=6"]


def quickstart(workdir, *extra, env=None) -> subprocess.CompletedProcess:
  """The run's stdout and stderr as written (text=True would turn the bar's \r into \n)."""
  cmd = [sys.executable, "-m", "pn_jax.main", *QUICK, f"--workdir={workdir}", *extra]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300, env=env)
  out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def log_lines(stderr: str) -> list[tuple[str, str, int, str]]:
  """(level letter, file name, line number, message) of each absl line, read past the \\r
  redraws of the progress bar."""
  found = []
  for line in stderr.split("\n"):
    match = ABSL_LINE.fullmatch(line.split("\r")[-1])
    if match:
      level, name, lineno, message = match.groups()
      found.append((level, name, int(lineno), message))
  return found


def is_pn_jax_log_call(name: str, lineno: int) -> bool:
  """Whether some pn_jax/**/<name> has a logging call at line `lineno`."""
  for path in PN_JAX.rglob(name):
    lines = path.read_text().splitlines()
    if lineno <= len(lines) and "logging." in lines[lineno - 1]:
      return True
  return False


def users_env() -> dict:
  """The environment of a user's shell: no JAX_PLATFORMS (conftest sets it for pytest itself),
  so a run's jax probes every platform installed, libtpu's TPU included."""
  return {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}


@pytest.fixture(scope="module")
def users_quickstart(prepared, tmp_path_factory):
  """(workdir, its output): the short quickstart, run as a user runs it (users_env)."""
  workdir = copy_workdir(prepared, tmp_path_factory.mktemp("quickstart"))
  return workdir, quickstart(workdir, env=users_env())


def test_a_run_logs_only_its_own_info_lines(users_quickstart):
  out = users_quickstart[1]
  lines = log_lines(out.stderr)
  infos = [(name, n, msg) for level, name, n, msg in lines if level == "I"]
  assert [x for x in infos if not is_pn_jax_log_call(x[0], x[1])] == [], out.stderr[-3000:]
  messages = [msg for _, _, msg in infos]
  assert any(m.startswith("process 0/1, ") for m in messages)
  assert [m.split(",")[0] for m in messages if m.startswith("completed step")] == [
      "completed step: 2", "completed step: 4", "completed step: 6"]
  assert any(m.startswith("[eval] step 6 ") for m in messages)
  for noise in ("_NonBlockingMetadataStore", "ocdbt", "Unable to initialize backend"):
    assert noise not in out.stderr
  assert "pretrain: 100%" in out.stderr  # the bar
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 6
  assert len(out.stderr.split("\n")) == len(lines) + 2  # log lines, the bar, the last \n


def test_log_level_info_shows_the_libraries_lines(prepared, tmp_path):
  out = quickstart(copy_workdir(prepared, tmp_path), "--log_level=info")
  infos = [(name, n) for level, name, n, _ in log_lines(out.stderr) if level == "I"]
  assert [x for x in infos if not is_pn_jax_log_call(*x)], out.stderr[-3000:]
  assert "_NonBlockingMetadataStore" in out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 6


def test_pn_jax_files_are_found_by_path():
  """The filter's idea of "pn-jax's code" is the package directory: every module is inside."""
  for path in PN_JAX.rglob("*.py"):
    assert log_setup.is_own(record(pathname=str(path))), path
  assert not log_setup.is_own(record(pathname=str(pathlib.Path(logging.__file__))))


# --- no TPU probing without a TPU, no library notices (parallel/platforms.py, NOTICES) ---------

# What libtpu prints when jax probes for a TPU that is not there, orbax's read-only notices, and
# gloo's connection lines (multi-process only: test_multihost.py counts those).
NOISE = re.compile(r"TPU|libtpu|InitGoogle|Source Location Trace|read_only|read only|\[Gloo\]")


def test_quickstart_and_specialize_print_no_tpu_orbax_or_gloo_lines(users_quickstart, tmp_path):
  workdir, quick = users_quickstart
  runs = [quick]
  cmd = [sys.executable, "-m", "pn_jax.main", "--config=configs/finetune.py:tiny",
         f"--config.init_from={workdir}", "--config.data.domain=legal", "--mode=specialize",
         f"--workdir={tmp_path / 'legal'}", "--config.train.steps=2",
         "--config.train.eval_every=2", "--config.data.eval_batches=2"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=users_env())
  assert out.returncode == 0, out.stderr[-3000:]
  runs.append(out)
  for run in runs:
    noise = [line for line in (run.stdout + run.stderr).splitlines() if NOISE.search(line)]
    assert noise == [], "\n".join(noise)
  assert json.loads(out.stdout.strip().splitlines()[-1])["mode"] == "specialize"


@pytest.mark.parametrize("env, files, libtpu, gpu, expected", [
    ({}, [], True, False, "cpu"),  # libtpu installed, no TPU: CPU only
    ({}, ["/dev/vfio/vfio"], True, False, "cpu"),  # VFIO's control file alone is no TPU
    ({}, [], True, True, "cuda,cpu"),  # a CUDA GPU jax will use, and the CPU
    ({}, ["/dev/accel0"], True, False, None),  # a TPU (v4, v5p): jax's choice
    ({}, ["/dev/vfio/0"], True, False, None),  # a TPU (v5e and later)
    ({}, ["/dev/kfd"], True, False, None),  # an AMD GPU: jax's choice
    ({}, [], False, False, None),  # no libtpu: nothing probes a TPU
    ({"JAX_PLATFORMS": "cpu"}, [], True, True, None),  # the user's choice stands
    ({"JAX_PLATFORMS": ""}, [], True, False, None),
])
def test_default_platforms(monkeypatch, env, files, libtpu, gpu, expected):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: (None if name == "libtpu" and not libtpu
                                        else real(name, *a)))
  monkeypatch.setattr(xla_flags, "gpu_expected", lambda: gpu)
  match = lambda pattern: fnmatch.filter(files, pattern)
  assert platforms.default_platforms(env, files=match) == expected


def test_a_failed_saves_late_thread_error_at_exit_is_hidden_only_after_a_refused_write(
    monkeypatch):
  """orbax's thread of a failed save may outlive the main thread and log 'cannot schedule new
  futures after shutdown': hidden after a refused write once the main thread has ended, shown
  otherwise (a normal run's late error is a real one)."""
  import threading
  from pn_jax import log_setup

  def record(exc):
    return logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/future.py", 1, "x",
                             None, (type(exc), exc, None))
  late = RuntimeError("cannot schedule new futures after shutdown")
  f = log_setup.StorageNoiseFilter()
  assert f.filter(record(late))  # the main thread is alive: shown
  assert not f.filter(record(OSError(27, "File too large")))  # a refused write: hidden, noted
  assert f.filter(record(late))  # the main thread still alive: shown
  ended = threading.Thread(target=lambda: None)  # never started: not alive
  monkeypatch.setattr(threading, "main_thread", lambda: ended)
  assert not f.filter(record(late))
  assert log_setup.StorageNoiseFilter().filter(record(late))  # no refused write before: shown
