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

DATA_AXIS = "data"


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           initialization_timeout=300) -> None:
  """Joins JAX's multi-controller runtime when this is one process of many.

  Explicit arguments win; otherwise JAX's own detection applies (Cloud TPU,
  SLURM, Open MPI, the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID environment variables). A lone process on a machine with no
  cluster environment starts nothing.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  cluster = any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                          "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"))
  if coordinator_address is None and not cluster:
    return
  if num_processes == 1:
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=initialization_timeout)
  logging.info("Joined the JAX runtime as process %d of %d (%d local / %d global devices).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


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
    raise ValueError(
        f"The global batch size {global_batch} does not divide evenly over {devices} devices "
        f"({processes} process(es)). Use a multiple of {devices}, e.g. "
        f"--config.batch_size={max(devices, global_batch - global_batch % devices)}.")
  return global_batch // processes


def to_global(local_batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Host arrays holding this process's rows -> one global array per key, sharded on `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a host (or single-device) pytree on every device of the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda idx: np.asarray(x)[idx]), tree)


def fetch(tree):
  """Fully-replicated device arrays -> numpy, without a cross-process gather."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)
