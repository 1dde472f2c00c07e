"""NVIDIA GPUs by name, as the compile-only devices of JAX's CUDA plugin, on a host without one.

`parse("h100x8")` -> a `GpuTopology`; `devices(topology)` -> its devices, for a
Mesh that `jax.jit(...).lower(...).compile()` compiles for with the real CUDA
compiler (XLA:GPU, cuDNN, Triton, ptxas) and no GPU, driver or /dev/nvidia*:
`jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=<GpuTargetConfigProto text>)` (jax tests/deviceless_aot_test.py).
Needs the plugin: `pip install "jax[cuda12]==<jax version>"`.

Names: `h100` (one GPU), `h100x8` (one node of eight), `h100:2x8` (two nodes of
eight); GPUs: a100-40gb, a100-80gb, h100, h200 (SXM parts).
"""

import importlib.metadata
import importlib.util
import math
import re
from typing import List, NamedTuple

from byol_jax.errors import ConfigError
from byol_jax.preflight import roofline

GB = 1e9


class Gpu(NamedTuple):
  device_kind: str        # what jax.devices()[0].device_kind says on the real part
  compute_capability: int  # major (8: Ampere, 9: Hopper)
  sms: int
  clock_ghz: float        # boost clock
  memory_bytes: int       # XLA's device_memory_size for the part
  bandwidth: float        # HBM bytes/s
  bf16_flops: float       # dense bf16 tensor-core peak, FLOP/s (no sparsity)
  l2_bytes: int
  shared_per_sm: int
  source: str


# SMs, clock, L2, shared memory and (but for H200) memory size and bandwidth: XLA's
# xla/tools/hlo_opt/gpu_specs/{a100_sxm_40,a100_sxm_80,h100_sxm}.txtpb (the target
# descriptions XLA ships). H200: H100 SXM's die (same SMs, clock and caches) with the
# 141 GB and 4.8 TB/s of NVIDIA's H200 page. Peaks: NVIDIA's datasheets (dense, halved
# from the "with sparsity" figures).
GPUS = {
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", 8, 108, 1.41, 42331013120, 1555.2 * GB, 312e12,
                     41943040, 167936, "https://www.nvidia.com/content/dam/en-zz/Solutions/"
                     "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", 8, 108, 1.41, 85100068864, 2039.04 * GB, 312e12,
                     41943040, 167936, "https://www.nvidia.com/content/dam/en-zz/Solutions/"
                     "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    "h100": Gpu("NVIDIA H100 80GB HBM3", 9, 132, 1.98, 84978434048, 3352.32 * GB, 989.4e12,
                52428800, 233472, "https://www.nvidia.com/en-us/data-center/h100/ (SXM5)"),
    "h200": Gpu("NVIDIA H200", 9, 132, 1.98, 141 * 10**9, 4800 * GB, 989.4e12,
                52428800, 233472, "https://www.nvidia.com/en-us/data-center/h200/ (SXM)"),
}
FORMS = ("GPU names: a100-40gb, a100-80gb, h100, h200 (one GPU); GPUxN for one node of N "
         "(h100x8); GPU:MxN for M nodes of N (h100:2x8)")
PLUGIN = "jax_plugins.xla_cuda12"


def install_line() -> str:
  """One line: the CUDA compiler is missing, and the pip command that adds it."""
  return (f'the CUDA compiler (JAX\'s CUDA 12 plugin) is not installed; install it with `pip '
          f'install "jax[cuda12]=={_version("jax")}"` (about 4.4 GB; no GPU needed to compile).')


class GpuTopology(NamedTuple):
  name: str       # as asked, e.g. "h100:2x8"
  gpu: str        # key of GPUS
  nodes: int
  gpus_per_node: int

  @property
  def num_devices(self) -> int:
    return self.nodes * self.gpus_per_node

  # The TPU topology's fields the compile job reads, so both print alike.
  @property
  def chips(self) -> int:
    return self.num_devices

  @property
  def topology_name(self) -> str:
    return f"{self.gpu}:{self.nodes}x{self.gpus_per_node}"


def is_gpu(name) -> bool:
  return bool(name) and re.split(r"[x:]", name.strip().lower())[0] in GPUS


def parse(name: str) -> GpuTopology:
  """`h100`, `h100x8`, `h100:2x8` -> GpuTopology; ConfigError listing the forms."""
  text = (name or "").strip().lower()
  m = re.fullmatch(r"([a-z0-9-]+?)(?:x(\d+)|:(\d+)x(\d+))?", text)
  if not m or m.group(1) not in GPUS:
    raise ConfigError(f"Unknown GPU topology {name!r}; set --config.compile.topology to one of "
                      f"the {FORMS}.")
  nodes, per_node = (int(m.group(3)), int(m.group(4))) if m.group(3) else (1, int(m.group(2) or 1))
  if nodes < 1 or not 1 <= per_node <= 8:
    raise ConfigError(f"GPU topology {name!r}: a node holds 1 to 8 GPUs and there is at least "
                      f"one node; the {FORMS}.")
  return GpuTopology(name, m.group(1), nodes, per_node)


def by_device_kind(device_kind: str):
  """The GPUS key of a real device's `device_kind`, or None."""
  return next((k for k, g in GPUS.items() if g.device_kind == device_kind), None)


def chip(gpu: str) -> roofline.Chip:
  """The GPU as the roofline's Chip."""
  g = GPUS[gpu]
  return roofline.Chip(g.bf16_flops, g.memory_bytes, g.bandwidth, g.source)


def versions() -> dict:
  """The installed CUDA wheels the compiler uses (cuDNN, CUDA runtime, ptxas)."""
  names = {"jax_cuda12_plugin": "jax-cuda12-plugin", "cudnn": "nvidia-cudnn-cu12",
           "cuda_runtime": "nvidia-cuda-runtime-cu12", "ptxas (cuda-nvcc)": "nvidia-cuda-nvcc-cu12",
           "cublas": "nvidia-cublas-cu12"}
  return {key: _version(dist) for key, dist in names.items()}


def target_config(gpu: str) -> str:
  """XLA's GpuTargetConfigProto, as text, for `gpu` with the installed cuDNN's version."""
  g = GPUS[gpu]
  cudnn = [int(p) for p in re.findall(r"\d+", _version("nvidia-cudnn-cu12") or "9.0.0")[:3]]
  major, minor, patch = (cudnn + [0, 0, 0])[:3]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g.shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {g.sms}
  fpus_per_core: {128 if g.compute_capability >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(g.bandwidth)}
  l2_cache_size: {g.l2_bytes}
  clock_rate_ghz: {g.clock_ghz}
  device_memory_size: {g.memory_bytes}
  shared_memory_per_block_optin: {g.shared_per_sm - 1024}
  cuda_compute_capability {{ major: {g.compute_capability} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}
device_description_str: "{g.device_kind}"
"""


def devices(topology: GpuTopology) -> List:
  """The compile-only devices of `topology` (the CUDA plugin; no GPU needed)."""
  if importlib.util.find_spec(PLUGIN.split(".")[0]) is None or \
      importlib.util.find_spec(PLUGIN) is None:
    raise ImportError(install_line())
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # The plugin would initialise CUDA (cuInit fails without a driver); compiling needs no GPU.
  if not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
  desc = topologies.get_topology_desc(
      platform="cuda", target_config=target_config(topology.gpu),
      topology=f"1x{topology.nodes}x{topology.gpus_per_node}")
  found = list(desc.devices)
  if len(found) != topology.num_devices:
    raise RuntimeError(f"the CUDA plugin listed {len(found)} devices for {topology.name}, "
                       f"expected {topology.num_devices}.")
  return found


def largest_batch(per_device: float, needed: float, fixed: float, memory: float,
                  headroom: float) -> int:
  """The most examples per GPU (a multiple of 8, or a power of two below 8) that fit `memory`
  with `headroom` spare, the memory beyond `fixed` (parameters, optimiser state) scaled
  linearly with the batch: an estimate (compile it to check)."""
  per_example = max(needed - fixed, 1.0) / per_device
  most = (memory * (1 - headroom) - fixed) / per_example
  if most < 1:
    return 0
  return int(most // 8 * 8) if most >= 8 else 2 ** math.floor(math.log2(most))


def _version(dist: str):
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None
