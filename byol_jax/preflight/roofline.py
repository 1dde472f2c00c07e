"""Peak figures of Cloud TPU chips and the roofline arithmetic on a compiled step.

An ESTIMATE, never a measurement: a step takes at least its FLOPs at the
chip's bf16 peak and at least its HBM traffic (XLA's `bytes accessed`) at the
chip's HBM bandwidth; the larger bound is the roofline step time, and the
FLOPs' share of it the MFU ceiling. Where a chip shows several devices (v3:
one per TensorCore), each device gets its share of the chip's peak, bandwidth
and HBM.

`CALIBRATION` says how far the estimate is from a measured TPU speed:
`benchmarks/tpu_scale.py --calibrate` compiles a supervised ResNet-50 step
(byol_jax's encoder, a linear head, SGD, bf16, batch 1024) for v3-8 and puts
its estimate beside the flax ImageNet example's published speed on a v3-8.
"""

from typing import NamedTuple


class Chip(NamedTuple):
  bf16_flops: float     # peak FLOP/s per chip
  hbm_bytes: float      # HBM capacity per chip
  hbm_bandwidth: float  # HBM bytes/s per chip
  source: str


GIB, GB = 2.0**30, 1e9
# Cloud TPU's system-architecture pages, as published (GiB where they say GiB, GB where GB).
CHIPS = {
    "v3": Chip(123e12, 32 * GIB, 900 * GB, "https://cloud.google.com/tpu/docs/v3"),
    "v4": Chip(275e12, 32 * GIB, 1200 * GB, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(197e12, 16 * GB, 819 * GB, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(459e12, 95 * GB, 2765 * GB, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(918e12, 32 * GB, 1638 * GB, "https://cloud.google.com/tpu/docs/v6e"),
}

IMAGENET_TRAIN = 1_281_167
# DeepMind's byol README: 1000 epochs of ResNet-50 in about 8 h on 512 v3 cores (256 chips).
REFERENCE_IMAGES_PER_S_PER_V3_CHIP = 1000 * IMAGENET_TRAIN / (8 * 3600) / 256
# The flax ImageNet example (examples/imagenet/README.md): ResNet-50, batch 1024, bf16,
# 100 epochs in 4.4 h on a v3-8 (4 chips).
FLAX_IMAGES_PER_S_PER_V3_CHIP = 100 * IMAGENET_TRAIN / (4.4 * 3600) / 4
# Published speed / roofline estimate of that step on v3-8, as `benchmarks/tpu_scale.py
# --calibrate` measured it on 2026-12-05 (experiments/tpu_scale.md): real steps ran at about
# this fraction of the estimate, so multiply an estimate of images/s by it.
CALIBRATION = 0.64


def estimate(flops: float, bytes_accessed: float, examples: float, chip: Chip,
             devices_per_chip: int = 1) -> dict:
  """Roofline of one step of one device: `flops` and `bytes_accessed` per device per step,
  `examples` per device per step. Images/s are per chip."""
  peak = chip.bf16_flops / devices_per_chip
  bandwidth = chip.hbm_bandwidth / devices_per_chip
  compute_s, memory_s = flops / peak, bytes_accessed / bandwidth
  step_s = max(compute_s, memory_s)
  return {
      "compute_s": compute_s,
      "memory_s": memory_s,
      "step_s": step_s,
      "bound": "memory" if memory_s > compute_s else "compute",
      "bytes_per_flop": bytes_accessed / flops,
      # FLOP per byte at which the chip's two bounds meet.
      "ridge_flop_per_byte": chip.bf16_flops / chip.hbm_bandwidth,
      "mfu_ceiling": compute_s / step_s,
      "images_per_s_per_chip": examples * devices_per_chip / step_s,
  }


def reference_mfu(flops_per_image: float) -> float:
  """The DeepMind reference's model-FLOP utilisation, had it run `flops_per_image`."""
  return REFERENCE_IMAGES_PER_S_PER_V3_CHIP * flops_per_image / CHIPS["v3"].bf16_flops
