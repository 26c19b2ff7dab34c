"""Ahead-of-time compiles for a TPU slice from this CPU machine (pn_jax.aot), through the CLI.

The compiles run in a subprocess, as a user runs them: libtpu is loaded there and nowhere else,
so the tests that share this worker keep a plain CPU jax. Skipped only where libtpu is not
installed (`pip install -e '.[tpu]'`; the `test` extra includes it on Linux x86-64).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest

from conftest import REPO
from pn_jax import aot, cli
from pn_jax.train import flops

# The two stage lines (absl INFO) an aot run logs before its result.
PROGRESS = re.compile(r"^I\d{4} .* aot\.py:\d+\] \[\d/2\] ")

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def run_aot(*args):
  """`python -m pn_jax.aot ARGS` -> (exit code, JSON record or None, stderr)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  out = subprocess.run([sys.executable, "-m", "pn_jax.aot", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  return out.returncode, json.loads(lines[-1]) if lines else None, out.stderr


@needs_libtpu
def test_tiny_pn_compiles_for_v5e_2x2_and_fits():
  code, record, err = run_aot("--config=configs/pn.py:tiny", "--topology=v5e:2x2")
  assert code == 0, err[-3000:]
  assert record["chip"] == "TPU v5 lite" and record["devices"] == 4
  assert record["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert record["batch"] == 4 * 8  # --per_chip_batch's default: 8 sequences a chip
  assert record["fits"] and 0 < record["total_gib"] < record["hbm_gib_per_chip"] == 16
  assert record["argument_bytes"] > 0 and record["alias_bytes"] > 0  # the state is donated
  assert record["compiled_tflops_per_step"] > 0 and 0 < record["mfu_ceiling"] <= 1
  assert record["compiled_over_model_flops"] == pytest.approx(1 / record["mfu_ceiling"])
  # Only its two progress lines: libtpu's host-probing warnings are silenced.
  assert [line.split("] ", 1)[-1] for line in err.strip().splitlines()] == [
      "[1/2] v5e:2x2 x1 slice(s): loading libtpu for the topology",
      "[2/2] compiling the pretrain step for 4 TPU v5 lite devices (batch 32)"], err


@needs_libtpu
def test_a_7b_pn_on_one_v5e_chip_is_reported_not_fitting():
  code, record, err = run_aot("--config=configs/pn.py:1b", "--topology=v5e:1x1")
  assert code == 2 and record is not None and not record["fits"], err[-3000:]
  assert record["total_gib"] > 16 and record["margin_gib"] < 0
  (line,) = [x for x in err.splitlines() if x.strip() and not PROGRESS.match(x)]
  assert line.startswith("error: DoesNotFit: pn_1b (pretrain step) on v5e:1x1") and "GiB" in line


@needs_libtpu
def test_bad_topology_and_mesh_are_one_line_errors():
  code, _, err = run_aot("--config=configs/pn.py:tiny", "--topology=v5e:3x3")
  assert code == 2 and "error: UsageError: --topology=v5e:3x3: libtpu refused it" in err
  code, _, err = run_aot("--config=configs/pn.py:tiny", "--topology=v5e:2x2",
                         "--config.mesh.tensor=3")
  assert code == 2 and "error: ConfigError: config.mesh" in err


def test_topology_names_are_checked_before_libtpu_loads():
  assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  for bad in ("v9:2x2", "v5e", "v5e:4", "v5e:0x2", ""):
    with pytest.raises(cli.UsageError, match="topology"):
      aot.parse_topology(bad)


def test_slices_beyond_their_generation_are_refused_before_libtpu_loads():
  """Issue 25, item 8: v5e:1000x1000 aborted inside libtpu (exit 134); v5e:2x2x2 (a 3D v5e)
  compiled as if it existed. Each generation's pod bounds its slices."""
  for good in ("v5e:16x16", "v5e:2x2x1", "v6e:8x16", "v5p:16x20x28", "v4:16x16x16"):
    assert aot.parse_topology(good)[0] == good.split(":")[0]
  for bad, match in [("v5e:1000x1000", "v5e slices are 2D, at most 16x16"),
                     ("v5e:16x32", "at most 16x16"), ("v6e:32x8", "at most 16x16"),
                     ("v5e:2x2x2", "v5e slices are 2D"),
                     ("v5p:4x4x1000", "16000 chips, but a v5p slice has at most 8960"),
                     ("v4:16x16x32", "8192 chips, but a v4 slice has at most 4096")]:
    with pytest.raises(cli.UsageError, match=rf"^--topology='{bad}': .*{match}"):
      aot.parse_topology(bad)


@pytest.mark.parametrize("args,expected", [
    (["--topology=v5e:1000x1000"], "error: UsageError: --topology='v5e:1000x1000': v5e slices"),
    (["--topology=v5e:2x2", "--per_chip_batch=0"],
     "error: UsageError: flag --per_chip_batch=0: 0 is not a positive integer"),
    (["--topology=v5e:2x2", "--per_chip_batch=-1"],
     "error: UsageError: flag --per_chip_batch=-1: -1 is not a positive integer"),
], ids=["v5e_1000x1000", "per_chip_batch_0", "per_chip_batch_-1"])
def test_bad_slices_and_batches_are_one_line_errors_without_libtpu(args, expected):
  """--per_chip_batch=0/-1 used to be taken as "not given" (the config's batch compiled)."""
  code, record, err = run_aot("--config=configs/pn.py:tiny", *args)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and record is None and lines == [lines[-1]], err[-3000:]
  assert lines[-1].startswith(expected), lines[-1]


def test_missing_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(cli.UsageError, match=r"libtpu is not installed.*pip install -e '\.\[tpu\]'"):
    aot.tpu_devices("v5e:2x2")


def test_chip_table_agrees_with_the_mfu_peak_table():
  kinds = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
  for generation, kind in kinds.items():
    device = types.SimpleNamespace(device_kind=kind)
    assert flops.peak_flops(device) == aot.CHIPS[generation].peak_tflops * 1e12


def test_out_of_hbm_messages_are_read():
  assert aot.oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                       "required for HLO temporaries (22.83G) exceeds available HBM "
                       "(15.75G).") == (22.83 * 2**30, 15.75 * 2**30)
  assert aot.oom_bytes("Used 60.5G of 15.75G hbm. Exceeded hbm capacity by 44.75G.") == (
      60.5 * 2**30, 15.75 * 2**30)
  assert aot.oom_bytes("INTERNAL: something else") is None


@needs_libtpu
def test_finetune_step_is_the_projected_small_model_on_one_chip():
  code, record, err = run_aot("--config=configs/pn.py:tiny", "--topology=v5e:1x1", "--finetune")
  assert code == 0, err[-3000:]
  assert record["step"] == "finetune" and record["devices"] == 1 and record["fits"]
  assert record["mlp_kind"] == "dense" and record["k"] == 1


@needs_libtpu
def test_a_global_batch_on_the_command_line_is_compiled_as_given():
  code, record, err = run_aot("--config=configs/pn.py:tiny", "--topology=v5e:2x2",
                              "--config.data.batch_size=12", "--per_chip_batch=2")
  assert code == 0 and record["batch"] == 12, err[-3000:]


def test_per_chip_batch_scales_with_the_data_parallel_chips():
  from pn_jax.config import base_config
  config = base_config()
  config.mesh.update(data=2, fsdp=-1, tensor=2)
  assert aot.with_per_chip_batch(config, [object()] * 16, 8).data.batch_size == 8 * 2 * 4
  assert config.data.batch_size == 8  # the caller's config is left as it was
