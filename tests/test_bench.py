"""The train-step benchmark runs on CPU, and the speed changes behind it keep the math."""

import gzip
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config
from pn_jax import bench
from pn_jax.parallel import xla_flags
from pn_jax.train.loss import cross_entropy, xent_sum_reference


def _tiny(name, arg="tiny"):
  config = load_config(f"bench/{name}", arg)
  config.bench.update(warmup=1, steps=2)
  return config


def _data_parallel_grad_bytes(record, config):
  """The all-reduce a data-parallel step needs: every fp32 gradient once, and a few scalars;
  measured on CPU, one more embedding-sized gradient (the tied embedding's, reduced twice)."""
  embedding = 4 * config.model.vocab_size * config.model.d_model
  return 4 * record["params"], 4 * record["params"] + embedding + 4096


def test_bench_one_dense_record():
  config = _tiny("gpt2_dense")
  record = bench.bench_one(config)
  assert record["config"] == "gpt2_dense" and record["platform"] == "cpu"
  assert record["step_time_s"] > 0 and record["compile_s"] > 0
  assert record["tokens_per_s"] == pytest.approx(8 * 64 / record["step_time_s"])
  assert record["peak_mib"] is None  # CPU has no allocator stats
  assert record["mfu"] is None  # no peak FLOP/s known for a CPU
  assert record["model_tflops_per_step"] > 0 and np.isfinite(record["loss"])
  assert record["params"] > 0 and record["attention_kernel"] == "xla"
  assert record["mesh"] == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  low, high = _data_parallel_grad_bytes(record, config)
  assert low <= record["collective_bytes"]["all-reduce"] <= high
  assert record["collective_bytes"]["all-gather"] == 0


def test_bench_projected_finetune_is_the_dense_model():
  """project() of a PN gives a dense model with the dense bench model's parameter count."""
  dense = bench.bench_one(_tiny("gpt2_dense"))
  finetune = bench.bench_one(_tiny("gpt2_pn", "tiny,finetune=1"))
  assert finetune["config"] == "gpt2_pn_projected_finetune"
  assert finetune["mlp_kind"] == "dense" and finetune["params"] == dense["params"]


def test_cli_prints_one_json_line_per_configuration():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run(
      [sys.executable, "-m", "pn_jax.bench", "--config=configs/bench/gpt2_mix.py:tiny",
       "--config.bench.steps=1", "--config.bench.warmup=0",
       "--config.bench.sweep=data.cluster_batching='mixed'"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["cluster_batching"] for r in records] == ["homogeneous", "mixed"]
  assert records[1]["config"] == "gpt2_mix[data.cluster_batching='mixed']"
  assert all(r["mlp_kind"] == "mixture" and r["step_time_s"] > 0 for r in records)


def test_a_step_the_device_cannot_hold_is_refused_in_one_line():
  """The README's bench command on a CPU: a step far beyond the host's memory (here the tiny
  model at seq_len 32768, ~900 GiB of attention temps) is a user error naming the device and
  the :tiny variant, raised before XLA tries to allocate it."""
  from pn_jax import cli
  from pn_jax.train.memory import DoesNotFit
  config = _tiny("gpt2_dense")
  with config.unlocked():
    config.data.seq_len = config.model.max_len = 32768
  with pytest.raises(DoesNotFit) as e:
    bench.bench_one(config, config_file="configs/bench/gpt2_dense.py")
  assert cli.is_user_error(e.value)
  assert re.match(r"gpt2_dense: the compiled train step needs [\d.]+ GiB per device, the cpu "
                  r"device \(cpu\) has [\d.]+ GiB available; on a CPU run the :tiny variant "
                  r"\(--config=configs/bench/gpt2_dense.py:tiny\)", str(e.value)), str(e.value)
  assert bench.available_bytes(jax.devices()[0]) > 0  # /proc/meminfo's share of one device


def test_sweep_overrides():
  config = load_config("bench/gpt2_dense", "tiny")
  variant = bench.apply_overrides(config, "model.remat=dots,data.batch_size=16")
  assert (variant.model.remat, variant.data.batch_size) == ("dots", 16)
  assert config.model.remat == "none"  # the base config is untouched
  with pytest.raises(ValueError, match="unknown config key"):
    bench.apply_overrides(config, "model.nope=1")


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_cross_entropy_matches_autodiff(chunk, dtype):
  k = jax.random.split(jax.random.key(1), 4)
  h = jax.random.normal(k[0], (2, 16, 8)).astype(dtype)
  w = jax.random.normal(k[1], (8, 50)).astype(dtype)
  t = jax.random.randint(k[2], (2, 16), 0, 50)
  m = (jax.random.uniform(k[3], (2, 16)) > 0.3).astype(jnp.float32)
  fused = jax.value_and_grad(lambda h, w: cross_entropy(h, w, t, m, chunk=chunk)[0], (0, 1))
  ref = jax.value_and_grad(lambda h, w: xent_sum_reference(h, w, t, m), (0, 1))
  (a, ga), (b, gb) = fused(h, w), ref(h, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(a, b, rtol=tol)
  for x, y in zip(ga, gb):
    assert x.dtype == y.dtype
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.linalg.norm(x - y) <= tol * np.linalg.norm(y)


def test_xla_flags_leave_cpu_alone_and_never_override(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert not xla_flags.gpu_expected()
  assert xla_flags.apply() == "--xla_force_host_platform_device_count=8"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
  forced = xla_flags.apply(force=True, extra="--xla_gpu_enable_cublaslt=true")
  assert forced.split() == ["--xla_gpu_enable_latency_hiding_scheduler=false",
                            "--xla_gpu_enable_cublaslt=true"]
  with pytest.raises(ValueError, match="preset"):
    xla_flags.apply("fastest")


def test_gpu_detection_without_jax_platforms(monkeypatch):
  """The README command sets no JAX_PLATFORMS: detection must not crash on a CPU-only install
  (find_spec('jax_plugins.x') raises when the jax_plugins namespace is absent)."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(xla_flags.os.path, "exists", lambda p: True)  # as if /dev/nvidiactl
  monkeypatch.setattr(xla_flags.importlib.util, "find_spec",  # as if the CUDA 12 plugin
                      lambda name: object() if name == "jax_cuda12_plugin" else None)
  assert xla_flags.gpu_expected() is True
  monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: None)  # no plugin
  assert xla_flags.gpu_expected() is False
  monkeypatch.setattr(xla_flags.importlib.util, "find_spec",
                      lambda name: (_ for _ in ()).throw(ModuleNotFoundError(name)))
  assert xla_flags.gpu_expected() is False


def test_collective_bytes_read_from_hlo_text():
  """Results of every collective (tuples from XLA's combiners: every element; an async
  all-gather's start: its result only; the done: nothing)."""
  from pn_jax.parallel.collectives import collective_bytes
  hlo = "\n".join([
      "  %all-reduce.1 = f32[32,768]{1,0} all-reduce(f32[32,768]{1,0} %a), channel_id=1",
      "  %ar.2 = (bf16[8]{0}, f32[4,4]{1,0}) all-reduce(bf16[8]{0} %b, f32[4,4]{1,0} %c)",
      "  %ars = f32[16]{0} all-reduce-start(f32[16]{0} %d), channel_id=3",
      "  %ard = f32[16]{0} all-reduce-done(f32[16]{0} %ars)",
      "  %ags = (f32[8]{0}, f32[16]{0}) all-gather-start(f32[8]{0} %e), dimensions={0}",
      "  %rs = f32[2,3]{1,0} reduce-scatter(f32[4,3]{1,0} %f), dimensions={0}",
      "  %add = f32[32,768]{1,0} add(f32[32,768]{1,0} %x, f32[32,768]{1,0} %y)"])
  got = collective_bytes(hlo)
  assert got["all-reduce"] == 32 * 768 * 4 + 8 * 2 + 16 * 4 + 16 * 4
  assert got["all-gather"] == 16 * 4 and got["reduce-scatter"] == 6 * 4
  assert got["all-to-all"] == got["collective-permute"] == 0


def test_profile_summary_classes_kernels(tmp_path):
  """A hand-made trace: 2 steps of a GEMM, a cuDNN attention kernel and an optimizer fusion."""
  hlo = ('%loop_add_fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, '
         'metadata={op_name="jit(train_step)/optimizer/add"}\n')
  with gzip.open(tmp_path / "hlo.txt.gz", "wt") as f:
    f.write(hlo)
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  for name, dur in [("nvjet_sm90_gemm", 600.0), ("cudnn_flash_fprop", 300.0),
                    ("loop_add_fusion_3", 100.0)] * 2:
    events.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "dur": dur, "args": {}})
  events.append({"ph": "X", "pid": 2, "tid": 1, "name": "python", "dur": 1e6})  # host: ignored
  (tmp_path / "p").mkdir()
  with gzip.open(tmp_path / "p" / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = bench.profile_summary(str(tmp_path), steps=2)
  assert summary["kernel_ms_per_step"] == pytest.approx(1.0)
  assert summary["by_kernel"] == {"matmul": 0.6, "attention": 0.3, "other_fusion": 0.1}
  assert summary["by_phase"]["optimizer"] == 0.1
  assert summary["part_ms"] == {"matmul": 0.6, "attention": 0.3, "optimizer": 0.1}


@pytest.mark.parametrize("kernel_class,op_name,part", [
    ("matmul", "jit(train_step)/transpose(jvp(LM))/blocks/mlp/mlp._formed_weights/dot_general",
     "pn_forming"),
    ("matmul", "", "matmul"),  # a cuBLAS kernel in a CUDA graph: no op name
    ("other_fusion", "jit(train_step)/jvp(LM)/blocks/attn_norm/reduce_sum", "norms"),
    ("other_fusion", "jit(train_step)/jvp(LM)/blocks/mlp/mul", "mlp_elementwise"),
    ("other_fusion", "jit(train_step)/jvp(LM)/blocks/attn/concatenate", "attention_other"),
    ("other_fusion", "jit(train_step)/transpose(jvp(cross_entropy))/convert", "cross_entropy"),
    ("other_fusion", "jit(train_step)/jvp(LM)/slice", "other")])
def test_profile_parts(kernel_class, op_name, part):
  """The model part each kernel's time is added to in `part_ms` (docs/benchmarks.md tables)."""
  assert bench.profile_part(kernel_class, op_name) == part


def test_scaling_runs_one_and_n_devices_per_mesh(capsys, monkeypatch):
  """launch/scaling.py (docs/benchmarks.md, "Scaling") on fake CPU devices: a bench process on
  1 device, one on N per mesh with N times the batch, and the efficiency of each."""
  sys.path.insert(0, str(REPO / "launch"))
  import scaling
  monkeypatch.chdir(REPO)
  assert scaling.main(["--platform=cpu", "--devices=2", "--per_device_batch=2",
                       "--meshes=data,fsdp", "--", "--config=configs/bench/gpt2_dense.py:tiny"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  one, data, fsdp, *summary = lines
  assert (one["devices"], one["batch"]) == (1, 2)
  assert (data["devices"], data["batch"], data["mesh"]) == (2, 4, {"data": 2, "fsdp": 1, "tensor": 1})
  assert (fsdp["devices"], fsdp["mesh"]) == (2, {"data": 1, "fsdp": 2, "tensor": 1})
  assert [s["mesh"] for s in summary] == ["data=2", "fsdp=2"]
  for many, s in zip((data, fsdp), summary):
    assert s["efficiency"] == pytest.approx(many["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert s["collective_bytes_n"] == many["collective_bytes"]
  # Data parallel all-reduces every fp32 gradient; fsdp all-gathers the sharded parameters too
  # (on CPU its gradients are all-reduced, not reduce-scattered); one device exchanges nothing.
  low, high = _data_parallel_grad_bytes(data, load_config("bench/gpt2_dense", "tiny"))
  assert low <= data["collective_bytes"]["all-reduce"] <= high
  assert data["collective_bytes"]["all-gather"] == 0
  assert fsdp["collective_bytes"]["all-gather"] >= 4 * data["params"] // 2
  assert fsdp["collective_bytes"]["all-reduce"] <= data["collective_bytes"]["all-reduce"]
  assert set(one["collective_bytes"].values()) == {0}
