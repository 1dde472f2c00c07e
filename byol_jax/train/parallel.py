"""The device mesh, shardings and multi-process start-up.

Data parallelism is expressed with shardings, not with pmap: parameters are
replicated over a 1-D mesh of every device of every process, the batch is split
along the `data` axis, and `jax.jit` inserts the all-reduces (gradient means and
the cross-replica BatchNorm moments alike).
"""

import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax.errors import ConfigError

DATA_AXIS = "data"


# Seconds before the JAX coordination service declares a silent process dead
# (heartbeat) and before a finishing process gives up waiting for the others at
# exit (shutdown). JAX's own defaults (100 s and 300 s) leave a job hung for
# minutes after a process dies; the environment variables override ours.
HEARTBEAT_TIMEOUT_ENV = "BYOL_HEARTBEAT_TIMEOUT_S"
SHUTDOWN_TIMEOUT_ENV = "BYOL_SHUTDOWN_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_SHUTDOWN_TIMEOUT_S = 120

# Variables JAX's own SLURM detection (jax/_src/clusters/slurm_cluster.py) reads;
# all are set inside an `srun` step, not in a bare `salloc` shell or sbatch script.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           initialization_timeout=300, heartbeat_timeout_seconds=None,
                           shutdown_timeout_seconds=None) -> None:
  """Joins JAX's multi-controller runtime when this is one process of many.

  Explicit arguments win; otherwise JAX's own detection applies (Cloud TPU VMs,
  an `srun` step of SLURM, Open MPI's mpirun, the JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables). A lone process, or
  one in a cluster environment of a single task, starts nothing.

  When any process dies, the others abort within about the heartbeat timeout
  (at once when process 0, the coordinator, is the one that died).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if num_processes == 1:
    return
  explicit = coordinator_address is not None
  on_tpu = _on_cloud_tpu_vm()
  if not (explicit or on_tpu or _in_multi_task_slurm_step() or _in_multi_rank_open_mpi()):
    return
  if heartbeat_timeout_seconds is None:
    heartbeat_timeout_seconds = int(os.environ.get(HEARTBEAT_TIMEOUT_ENV,
                                                   DEFAULT_HEARTBEAT_TIMEOUT_S))
  if shutdown_timeout_seconds is None:
    shutdown_timeout_seconds = int(os.environ.get(SHUTDOWN_TIMEOUT_ENV,
                                                  DEFAULT_SHUTDOWN_TIMEOUT_S))
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=slurm_local_device_ids(),
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                               shutdown_timeout_seconds=shutdown_timeout_seconds)
  except ValueError as e:
    if explicit:
      raise ConfigError(f"Cannot join the multi-process job at {coordinator_address} ({e}); "
                        "check --coordinator_address, --num_processes and --process_id.") from e
    # A TPU VM outside a pod (or a GKE node pool without the worker list) has
    # no cluster for JAX to find; it raises before starting anything.
    if not on_tpu:
      raise
    logging.info("No multi-host TPU environment found (%s); running as one process.", e)
    return
  logging.info("Joined the JAX runtime as process %d of %d (%d local / %d global devices).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def slurm_local_device_ids(environ=None):
  """The GPU ordinals this SLURM task should use, or None for JAX's default.

  JAX gives each SLURM task the single device [SLURM_LOCALID], which is right
  when every task of a node sees all its GPUs. With `--gpus-per-task=1` SLURM
  binds each task to one GPU (CUDA_VISIBLE_DEVICES names just it), and to the
  task that GPU is ordinal 0 whatever its SLURM_LOCALID, so [SLURM_LOCALID]
  would ask for a device that does not exist. JAX_LOCAL_DEVICE_IDS (set by the
  one-process-per-node sbatch script to all GPUs of the node) wins over both.
  """
  environ = os.environ if environ is None else environ
  if "JAX_LOCAL_DEVICE_IDS" in environ or not all(v in environ for v in _SLURM_VARS):
    return None
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  return [0] if len(visible) == 1 else None


def _in_multi_task_slurm_step() -> bool:
  return all(v in os.environ for v in _SLURM_VARS) and int(os.environ["SLURM_NTASKS"]) > 1


def _in_multi_rank_open_mpi() -> bool:
  # JAX finds Open MPI (<= 4) through the launcher URI that mpirun sets.
  return ("OMPI_MCA_orte_hnp_uri" in os.environ and
          int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (libtpu and TPU chips found when jax was imported).

  A pod's workers carry no environment variable that says so: JAX reads the
  worker list from the GCE metadata server, which only exists there.
  """
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Returns the per-process batch, or raises a readable error when it does not divide."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch % devices:
    raise ConfigError(
        f"The global batch size {global_batch} does not divide evenly over {devices} devices "
        f"({processes} process(es)). Use a multiple of {devices}, e.g. "
        f"--config.batch_size={max(devices, global_batch - global_batch % devices)}.")
  return global_batch // processes


def to_global(local_batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Host arrays holding this process's rows -> one global array per key, sharded on `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def fetch(tree):
  """Fully-replicated device arrays -> numpy, without a cross-process gather."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)
