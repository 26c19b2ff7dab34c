"""Multi-host runtime: `jax.distributed.initialize` with explicit timeouts, and batch shards.

One process per host (or per GPU). The coordinator address, process count and process id come
from, in order: the absl flags below, the environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID: what `launch/local.py` and `launch/gke_jobset.yaml` set), or
JAX's own cluster detection (SLURM, Open MPI, Cloud TPU / GKE TPU metadata). Initialization
always runs with explicit timeouts, and each process logs who it is and what it waits for
*before* blocking, so a hang names the missing peer instead of staying silent.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import flags, logging

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process runtime. auto: initialize when a coordinator/process count is given (flags or "
    "JAX_* env) or a multi-task SLURM step / Open MPI / multi-host TPU env is detected; on: "
    "always (JAX auto-detects what is not given, e.g. on TPU VM pods); off: single process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in the job (env JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes) (env JAX_PROCESS_ID).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Accelerators this process uses (env JAX_LOCAL_DEVICE_IDS); "
    "default: JAX's choice (under SLURM: the task's SLURM_LOCALID alone).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout_s", 300, "Seconds to wait for every process to join.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout_s", 100, "Seconds without a heartbeat before a peer is "
    "declared dead (the job then fails instead of hanging).")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "distributed_shutdown_timeout_s", 300, "Seconds to wait for every process at shutdown.")


def _env_int(name: str, env) -> int | None:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detected_cluster(env=None) -> str | None:
  """Name of a multi-process launcher found in `env` (os.environ), or None.

  Only environments where more than one process is certain: a single SLURM task or a
  single-host TPU VM runs without the distributed runtime.
  """
  env = os.environ if env is None else env
  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and (
      _env_int("SLURM_NTASKS", env) or 1) > 1:
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE", env) or 1) > 1:
    return "ompi"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  return None


def resolve(mode: str = "auto", coordinator_address: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: list[int] | None = None, env=None) -> dict | None:
  """The arguments for jax.distributed.initialize, or None for a single-process run."""
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int(
      "JAX_NUM_PROCESSES", env)
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID", env)
  if mode == "off":
    return None
  if mode == "auto" and not (coordinator_address or (num_processes or 1) > 1
                             or detected_cluster(env)):
    return None
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is outside [0, num_processes={num_processes})")
  return dict(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id,
              local_device_ids=[int(i) for i in local_device_ids] if local_device_ids else None)


def initialize(mode: str | None = None, *, init_timeout_s: int | None = None,
               heartbeat_timeout_s: int | None = None,
               shutdown_timeout_s: int | None = None, **kwargs) -> bool:
  """Joins the multi-process job described by flags/env (see module doc). -> initialized?

  Must run before anything touches a device. Arguments default to the absl flags.
  """
  if jax.distributed.is_initialized():
    return True
  fl = flags.FLAGS
  parsed = fl.is_parsed()
  pick = lambda v, flag: v if v is not None else (flag.value if parsed else flag.default)
  args = resolve(
      pick(mode, _DISTRIBUTED),
      coordinator_address=kwargs.get("coordinator_address", pick(None, _COORDINATOR)),
      num_processes=kwargs.get("num_processes", pick(None, _NUM_PROCESSES)),
      process_id=kwargs.get("process_id", pick(None, _PROCESS_ID)),
      local_device_ids=kwargs.get("local_device_ids", pick(None, _LOCAL_DEVICE_IDS)))
  if args is None:
    return False
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    # Cross-process collectives for CPU devices (tests, CPU clusters); ignored by GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  init_timeout = pick(init_timeout_s, _INIT_TIMEOUT)
  shown = {k: v for k, v in args.items() if v is not None}
  logging.info("jax.distributed.initialize(%s) [cluster env: %s]; waiting up to %d s for all "
               "processes to join", shown or "auto-detect", detected_cluster() or "none",
               init_timeout)
  t0 = time.time()
  try:
    jax.distributed.initialize(
        **args, initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=pick(heartbeat_timeout_s, _HEARTBEAT_TIMEOUT),
        shutdown_timeout_seconds=pick(shutdown_timeout_s, _SHUTDOWN_TIMEOUT))
  except Exception as e:  # jax raises assorted XlaRuntimeError/ValueError texts
    raise RuntimeError(
        f"jax.distributed.initialize({shown or 'auto-detect'}) failed after "
        f"{time.time() - t0:.0f} s: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
        "Check that every process was started with the same process count, that the "
        "coordinator (process 0's host:port) is reachable from this host, and "
        "--distributed_init_timeout_s") from e
  logging.info("joined in %.1f s: %s", time.time() - t0, describe())
  return True


def describe() -> str:
  """One line: this process, the process count and the devices (local / global)."""
  local = jax.local_devices()
  return (f"process {jax.process_index()}/{jax.process_count()}, {len(local)} local "
          f"{local[0].platform} devices of {jax.device_count()} "
          f"(local ids {[d.id for d in local]})")


def shutdown() -> None:
  """Leaves the job cleanly (a barrier with the shutdown timeout); no-op if never initialized."""
  if jax.distributed.is_initialized():
    logging.info("jax.distributed.shutdown: process %d", jax.process_index())
    jax.distributed.shutdown()


def data_shard(mesh: jax.sharding.Mesh, batch_size: int,
               batch_sharding: jax.sharding.Sharding | None = None) -> dict[str, int]:
  """Which slice of every global batch this process must load: {process_index, process_count}.

  The global batch's rows live on the devices that `batch_sharding` (default: the mesh's batch
  sharding) assigns them to; this process feeds the rows its own devices hold. That block is
  block `process_index` of `process_count` equal blocks (the pipeline's contract); processes that
  share a block (e.g. a tensor axis spanning hosts) load the same rows.
  """
  if batch_sharding is None:
    from pn_jax.parallel.mesh import batch_sharding as default_sharding
    batch_sharding = default_sharding(mesh)
  index_map = batch_sharding.addressable_devices_indices_map((batch_size,))
  rows = np.zeros(batch_size, bool)
  for (rows_slice,) in index_map.values():
    rows[rows_slice] = True
  return row_block(np.flatnonzero(rows), batch_size)


def row_block(held: np.ndarray, batch_size: int) -> dict[str, int]:
  """Sorted row ids a process holds -> their block {process_index, process_count}."""
  size = len(held)
  if size == 0 or batch_size % size or held[0] % size or held[-1] - held[0] + 1 != size:
    raise ValueError(f"process {jax.process_index()} holds batch rows {list(held)} of "
                     f"{batch_size}: not one contiguous equal block; order the mesh's devices "
                     "by process (jax.make_mesh does) or change config.mesh")
  return {"process_index": int(held[0] // size), "process_count": batch_size // size}


def is_multiprocess() -> bool:
  return jax.distributed.is_initialized() and jax.process_count() > 1


def exit_now(code: int) -> None:
  """Exits with `code`. With peers, skips the shutdown barrier (os._exit): a failed process that
  waited there would keep the whole job hanging; its exit makes the peers fail fast instead."""
  if not is_multiprocess():
    sys.exit(code)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def max_over_processes(value: int) -> int:
  """The largest of every process's `value`, on every process (a collective: call on all)."""
  if not is_multiprocess():
    return int(value)
  from jax.experimental import multihost_utils
  values_P = multihost_utils.process_allgather(np.asarray([value], np.int32))
  return int(np.asarray(values_P).max())
