"""What a run leaves behind: metrics.jsonl and TensorBoard events that agree with the resumed
checkpoint (each step once), readers that survive a torn line, nothing written by a refused
resume, and exports that are replaced whole, with consistent permissions."""

import glob
import json
import os
import pathlib
import signal
import struct

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import copy_workdir, load_config, snapshot
from pn_jax import experiment, modes, safetensors_io, storage, sweep_results
from pn_jax.model import build_model
from pn_jax.model.transformer import init_params
from pn_jax.modes.pretrain import pretrain
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train import metrics
from pn_jax.train.checkpoint import Checkpointer
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import create_state
from test_reliability import ENV, cli, latest, run_cli, start_cli, wait_for

# Runs pn_jax.main with the metrics row of step 5 torn half-way (as a kill mid-write leaves it),
# then stalled after touching a marker file: the test SIGKILLs it there, deterministically.
TEAR_ROW_5 = """
import os, runpy, time
from pn_jax.train import metrics
write = metrics.MetricWriter.write
def tear(self, step, scalars, prefix="train"):
  if step == 5:
    self._jsonl.write('{"step": 5, "split": "tr')
    self._jsonl.flush()
    open(os.environ["PN_TEST_MARKER"], "w").close()
    time.sleep(600)
  return write(self, step, scalars, prefix=prefix)
metrics.MetricWriter.write = tear
runpy.run_module("pn_jax.main", run_name="__main__", alter_sys=True)
"""
RUN = ["--config.train.steps=8", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
       "--config.train.eval_every=100000", "--config.train.async_checkpoint=False"]


def jsonl_rows(workdir) -> list[dict]:
  """Every line parsed: a torn line fails the test."""
  return [json.loads(x) for x in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]


def tb_steps(workdir, tag="train/loss") -> list[int]:
  """The steps TensorBoard shows for `tag`: the event files in order, where a SessionLog START
  event at step s hides the earlier events of steps >= s (TensorBoard's purge on restart)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
    data, pos = pathlib.Path(path).read_bytes(), 0
    while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n
      if event.session_log.status == event_pb2.SessionLog.START:
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


# --- metrics.jsonl on resume (item 7) -------------------------------------------------------


def test_kill9_then_resume_logs_each_step_once(prepared, tmp_path):
  """Killed after step 3's checkpoint, with step 4's row written and step 5's torn: the rerun
  redoes steps 4..8, and the log (and TensorBoard) hold steps 1..8 once each."""
  workdir = copy_workdir(prepared, tmp_path)
  marker = tmp_path / "torn"
  proc = start_cli(cli(workdir, *RUN, code=TEAR_ROW_5), tmp_path,
                   env={**ENV, "PN_TEST_MARKER": str(marker)})
  try:
    wait_for(marker.exists, proc, tmp_path)
  finally:
    proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert latest(workdir) == 3
  before = pathlib.Path(workdir, "metrics.jsonl").read_text()
  assert before.endswith('{"step": 5, "split": "tr') and '"step": 4' in before

  rerun = run_cli(cli(workdir, *RUN))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 3 " in rerun.stderr
  rows = jsonl_rows(workdir)
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
  assert [r["step"] for r in rows if r["split"] == "eval"] == [8]
  assert tb_steps(workdir) == list(range(1, 9))
  assert "dropped 2 row(s) after step 3" in rerun.stderr  # step 4's row and the torn one


def test_a_fresh_start_clears_a_leftover_log(tmp_path):
  """Steps 1..5 logged, the next writer resumes from step 3: rows and TensorBoard events of
  steps 4 and 5 are replaced by the redone ones (TensorBoard purges at step 4)."""
  first = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in range(1, 6):
    first.write(step, {"loss": 10.0 - step})
  first.close()
  (event_file,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  os.rename(event_file, tmp_path / "tb" / "events.out.tfevents.0000000000.first")  # sorts 1st
  second = metrics.MetricWriter(str(tmp_path), start_step=3, enabled=True)
  for step in range(4, 7):
    second.write(step, {"loss": 20.0 - step})
  second.close()
  rows = jsonl_rows(tmp_path)
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 9), (2, 8), (3, 7), (4, 16), (5, 15),
                                                    (6, 14)]
  assert tb_steps(tmp_path) == list(range(1, 7))


def test_truncate_log_keeps_complete_rows_up_to_the_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "split": "train", "loss": float(s)} for s in range(1, 6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "spl')
  os.chmod(path, 0o640)
  assert metrics.truncate_log(str(path), 3) == 3  # steps 4, 5 and the torn line
  assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])
  assert os.stat(path).st_mode & 0o777 == 0o640
  assert metrics.truncate_log(str(path), 3) == 0 and len(jsonl_rows(tmp_path)) == 3
  path.write_text(json.dumps(rows[0]))  # a complete row without its newline: fixed, none lost
  assert metrics.truncate_log(str(path), 3) == 0 and path.read_text() == json.dumps(rows[0]) + "\n"
  assert metrics.truncate_log(str(path), 0) == 1 and path.read_text() == ""
  assert metrics.truncate_log(str(tmp_path / "none.jsonl"), 0) == 0


def test_readers_skip_a_torn_last_line(tmp_path):
  rows = [{"step": 1, "split": "train", "loss": 3.0, "tokens_per_s": 9.0},
          {"step": 1, "split": "eval", "loss": 3.5, "perplexity": 33.1},
          {"step": 2, "split": "train", "loss": 2.5, "tokens_per_s": 9.0}]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "split": "train", "lo'
  (tmp_path / "metrics.jsonl").write_text(text)
  assert sweep_results.final_metrics(str(tmp_path)) == {
      "step": 2, "train_loss": 2.5, "tokens_per_s": 9.0, "eval_step": 1, "eval_loss": 3.5,
      "eval_perplexity": 33.1}
  assert experiment.pretrain_fit(str(tmp_path)) == {"train_loss_end": 2.75, "valid_loss_end": 3.5}
  assert metrics.read_rows(str(tmp_path / "metrics.jsonl")) == rows


# --- a refused resume writes nothing (item 8b) ----------------------------------------------




def _save_state(workdir, config, step):
  """A checkpoint of `config`'s fresh train state, as the training loop writes it."""
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh, rules = mesh_lib.make_mesh(config, jax.devices()[:1]), mesh_lib.logical_rules(config)
  tx, _ = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(build_model(config.model), tx, mesh, rules, jax.random.key(0))
    ckpt = Checkpointer(str(workdir), async_save=False)
    ckpt.save(step, state, config, force=True)
    ckpt.close()


def test_a_refused_resume_writes_nothing(prepared, tmp_path):
  workdir = copy_workdir(prepared, tmp_path)
  _save_state(workdir, load_config("pn"), 2)  # a k=8, h=8 PN
  before = snapshot(workdir, ignore=("LOCK",))  # (the lock's holder record: see workdir_lock)
  config = load_config("pn", "tiny,h=4")
  config.train.steps = 4
  with pytest.raises(modes.USER_ERRORS):  # (the shapes differ)
    pretrain(config, workdir)
  assert snapshot(workdir, ignore=("LOCK",)) == before


# --- exports (item 8c, item 6's export onto an existing file) -------------------------------


def _dense(seed):
  cfg = load_config("slm").model
  return nn.unbox(init_params(build_model(cfg), jax.random.key(seed))), cfg


def _tree(root) -> dict:
  return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None,
                                     p.stat().st_mode & 0o777)
          for p in sorted(pathlib.Path(root).rglob("*"))}


def test_export_is_0644_and_a_second_export_replaces_the_first(tmp_path):
  out = tmp_path / "export"
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"sentencepiece")
  safetensors_io.save(str(out), *_dense(1), tokenizer_path=str(tok), metadata={"step": 1})
  modes_of = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
  assert modes_of == {safetensors_io.WEIGHTS: 0o644, safetensors_io.CONFIG: 0o644,
                      "tokenizer.model": 0o644}
  assert out.stat().st_mode & 0o777 == 0o755
  params, cfg = _dense(2)
  safetensors_io.save(str(out), params, cfg, metadata={"step": 2})
  _, loaded, info = safetensors_io.load(str(out))
  assert info["step"] == 2 and sorted(p.name for p in out.iterdir()) == [
      safetensors_io.CONFIG, safetensors_io.WEIGHTS]
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok.model"]  # no leftovers


@pytest.mark.parametrize("failing", ["json.dump", "save_file"])
def test_a_failed_export_leaves_the_previous_one(tmp_path, monkeypatch, failing):
  out = tmp_path / "export"
  safetensors_io.save(str(out), *_dense(1), metadata={"step": 1})
  before = _tree(tmp_path)

  def broken(*args, **kwargs):
    if failing == "save_file":
      pathlib.Path(args[1]).write_bytes(b"half")  # what a crash mid-write leaves
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(safetensors_io.json if failing == "json.dump" else safetensors_io,
                      failing.split(".")[-1], broken)
  with pytest.raises(storage.OutOfSpace, match=f"could not write {out}: No space left on device"):
    safetensors_io.save(str(out), *_dense(2), metadata={"step": 2})
  assert _tree(tmp_path) == before


def test_export_refuses_a_path_that_is_not_an_export(tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(safetensors_io.ExportError,
                     match=r"export path .*/export exists and is not a pn-jax export "
                     r"\(a directory holding \['notes.txt'\]\); move it aside"):
    safetensors_io.save(str(out), *_dense(1))
  (out / "notes.txt").unlink()
  (out / safetensors_io.CONFIG).write_text('{"format": "hf"}')
  with pytest.raises(safetensors_io.ExportError, match="a config.json of format 'hf'"):
    safetensors_io.save(str(out), *_dense(1))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
  assert isinstance(safetensors_io.ExportError("x"), modes.USER_ERRORS)


def test_cli_export_onto_a_file_is_a_one_line_error(tmp_path):
  workdir = tmp_path / "run"
  _save_state(workdir, load_config("slm"), 3)
  (workdir / "export").write_text("my notes")
  out = run_cli(cli(workdir, "--mode=export", config="configs/slm.py:tiny"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: ExportError: the export path {workdir}/export exists and is not a pn-jax export "
      "(a file); move it aside or delete it, then export again")
  assert (workdir / "export").read_text() == "my notes"
