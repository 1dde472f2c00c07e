"""Cloud TPU slices by name, as the compile-only devices of the TPU compiler.

`parse("v4-128")` or `parse("v4:4x4x4")` -> a `Topology`; `devices(topology)`
-> that pod's devices, for a Mesh that `jax.jit(...).lower(...).compile()`
compiles for on any host where libtpu is installed (`pip install -e ".[tpu]"`),
with no TPU attached: `jax.experimental.topologies`, as MaxText's
train_compile does.

Cloud's accelerator names count TensorCores for v3, v4 and v5p (two per chip)
and chips for v5e (`v5litepod-N`) and v6e; a slice of N chips has Cloud's
default shape (v4-128: 64 chips, 4x4x4). The devices are what the runtime
shows: one per chip on v4 (its TensorCores run as one "megacore" device), v5p,
v5e and v6e; one per TensorCore on v3.
"""

import os
import re
from typing import List, NamedTuple, Tuple

from byol_jax.errors import ConfigError, MissingDependencyError

# generation -> (Cloud name prefix, counts TensorCores?, dimensions, chip config, devices per chip)
GENERATIONS = {
    "v3": ("v3", True, 2, "default", 2),
    "v4": ("v4", True, 3, "megacore", 1),
    "v5p": ("v5p", True, 3, "default", 1),
    "v5e": ("v5litepod", False, 2, "default", 1),
    "v6e": ("v6e", False, 2, "default", 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
CHIPS_PER_HOST = (2, 2, 1)  # every generation's multi-host VMs hold 2x2 chips
FORMS = ("Cloud accelerator names: v3-8, v4-128, v5p-128, v5litepod-256, v6e-64 "
         "(a power of two); or GEN:SHAPE: v4:4x4x4, v5p:4x4x8, v5e:16x16, v6e:8x8, v3:2x2")
TPU_INSTALL = ('the TPU compiler (libtpu) is not installed; install it with '
               '`pip install -e ".[tpu]"` (or `pip install "jax[tpu]"`), on any host, no TPU needed.')


class Topology(NamedTuple):
  name: str                 # as asked, e.g. "v4-128"
  generation: str           # key of GENERATIONS (and of roofline.CHIPS)
  shape: Tuple[int, ...]    # chips along each axis of one slice
  num_slices: int
  chip_config: str          # libtpu's chip_config_name
  devices_per_chip: int

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    count = self.num_slices
    for side in self.shape:
      count *= side
    return count

  @property
  def num_devices(self) -> int:
    return self.chips * self.devices_per_chip


def default_shape(chips: int, dims: int) -> Tuple[int, ...]:
  """Cloud's default slice shape for a power-of-two chip count: 2x2(x1), then the
  shortest side doubled (v4: 8 chips 2x2x2, 64 chips 4x4x4, 128 chips 4x4x8)."""
  if dims == 2 and chips == 1:
    return (1, 1)
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"no Cloud slice has {chips} chips")
  if dims == 3 and chips == 4:
    return (2, 2, 1)
  shape = [2] * dims
  while _product(shape) < chips:
    shape.sort()
    shape[0] *= 2
  return tuple(sorted(shape))


def parse(name: str, num_slices: int = 1) -> Topology:
  """A Cloud accelerator name or GEN:AxB[xC] -> Topology; ConfigError listing the forms."""
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ConfigError(f"compile.num_slices must be a positive integer, got {num_slices!r}.")
  text = (name or "").strip().lower()
  bad = ConfigError(f"Unknown TPU topology {name!r}; set --config.compile.topology to one of the "
                    f"{FORMS}.")
  m = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
  if not m:
    raise bad
  generation = _ALIASES.get(m.group(1), m.group(1))
  if generation not in GENERATIONS:
    raise bad
  _, counts_cores, dims, chip_config, per_chip = GENERATIONS[generation]
  if m.group(3):
    shape = tuple(int(s) for s in m.group(3).split("x"))
    if len(shape) != dims or min(shape) < 1:
      raise bad
  else:
    count = int(m.group(2))
    chips = count // 2 if counts_cores else count
    if counts_cores and count % 2:
      raise bad
    try:
      shape = default_shape(chips, dims)
    except ValueError:
      raise bad from None
  return Topology(name, generation, shape, num_slices, chip_config, per_chip)


def cloud_name(generation: str, chips: int) -> str:
  """Cloud's accelerator name of a slice of `chips` chips: ("v4", 64) -> "v4-128"."""
  prefix, counts_cores, _, _, _ = GENERATIONS[generation]
  return f"{prefix}-{chips * 2 if counts_cores else chips}"


def devices(topology: Topology) -> List:
  """The compile-only devices of every slice of `topology` (libtpu, no TPU needed)."""
  quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  if cloud_tpu_init.get_tpu_library_path() is None:
    raise MissingDependencyError(TPU_INSTALL)
  bounds = tuple(min(b, s) for b, s in zip(CHIPS_PER_HOST, (*topology.shape, 1)))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.topology_name, chip_config_name=topology.chip_config,
      chips_per_host_bounds=bounds, num_slices=topology.num_slices)
  found = list(desc.devices)
  if len(found) != topology.num_devices:
    raise RuntimeError(f"libtpu listed {len(found)} devices for {topology.topology_name} x "
                       f"{topology.num_slices}, expected {topology.num_devices}.")
  return found


def quiet_libtpu() -> None:
  """On a host without TPUs, keeps libtpu from asking for a metadata server and from
  logging that it found no pod; call it before JAX first lists its devices."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    return
  # No TPU is used: compiling processes may run side by side.
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v4-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


def _product(values) -> int:
  out = 1
  for v in values:
    out *= v
  return out
