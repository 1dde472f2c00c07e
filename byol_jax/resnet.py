"""ResNet v1 encoders (torchvision layout) in Haiku.

Our own torso rather than `hk.nets.ResNet`, for three reasons: Haiku's hard-codes
the stem max-pool and a logits layer; its "SAME" padding is asymmetric for
stride-2 layers, so weights would not carry over to PyTorch (explicit symmetric
padding, as torchvision does, makes the export exact); and it has no
GroupNorm + Weight Standardisation variant.

Module names follow torchvision (`conv1`, `bn1`, `layer1_0`, `downsample_conv`,
...) so that `export.py` is a plain renaming.
"""

from typing import Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

BN_DECAY = 0.9
BN_EPS = 1e-5

# depth -> (block kind, blocks per stage)
ARCHITECTURES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
NORMS = ("batch", "group_ws")
STEMS = ("imagenet", "cifar")


def embedding_dim(depth: int, width: int = 1, base_channels: int = 64) -> int:
  kind, _ = ARCHITECTURES[depth]
  return 8 * base_channels * width * (4 if kind == "bottleneck" else 1)


class WSConv2D(hk.Conv2D):
  """Conv2D whose kernel is standardised per output channel (Qiao et al. 2019)."""

  def __call__(self, inputs):
    w_shape = (*self.kernel_shape, inputs.shape[-1] // self.feature_group_count,
               self.output_channels)
    w = hk.get_parameter("w", w_shape, inputs.dtype, init=self.w_init)
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    w = (w - mean) * jax.lax.rsqrt(var + 1e-10)
    return jax.lax.conv_general_dilated(
        inputs, w, window_strides=self.stride, padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Norm(hk.Module):
  """BatchNorm or GroupNorm, chosen by name; `is_training` is ignored by GN."""

  def __init__(self, norm: str, zero_init: bool = False, name: Optional[str] = None):
    super().__init__(name=name)
    self.norm = norm
    self.scale_init = jnp.zeros if zero_init else jnp.ones

  def __call__(self, x, is_training: bool):
    if self.norm == "batch":
      # Under jit with a batch-sharded input the mean over axis 0 is already a
      # global (cross-replica) mean: XLA inserts the all-reduce.
      return hk.BatchNorm(True, True, BN_DECAY, eps=BN_EPS, scale_init=self.scale_init,
                          name="bn")(x, is_training=is_training)
    groups = min(32, x.shape[-1])  # narrow (base_channels < 64) nets have fewer channels
    return hk.GroupNorm(groups=groups, eps=BN_EPS, scale_init=self.scale_init, name="gn")(x)


def conv(norm: str, channels: int, kernel: int, stride: int, name: str):
  cls = WSConv2D if norm == "group_ws" else hk.Conv2D
  pad = kernel // 2
  return cls(channels, kernel, stride=stride, padding=((pad, pad), (pad, pad)),
             with_bias=False,
             w_init=hk.initializers.VarianceScaling(2.0, "fan_out", "normal"),
             name=name)


class Block(hk.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block, stride on the 3x3."""

  def __init__(self, kind: str, channels: int, stride: int, downsample: bool,
               norm: str, zero_init_residual: bool, name: str):
    super().__init__(name=name)
    self.kind, self.channels, self.stride = kind, channels, stride
    self.downsample, self.norm, self.zero_init = downsample, norm, zero_init_residual

  def __call__(self, x, is_training):
    c, s, n = self.channels, self.stride, self.norm
    if self.kind == "basic":
      layers = [(c, 3, s), (c, 3, 1)]
    else:
      layers = [(c, 1, 1), (c, 3, s), (4 * c, 1, 1)]
    shortcut = x
    if self.downsample:
      shortcut = conv(n, layers[-1][0], 1, s, "downsample_conv")(x)
      shortcut = Norm(n, name="downsample_norm")(shortcut, is_training)
    for i, (channels, kernel, stride) in enumerate(layers, start=1):
      x = conv(n, channels, kernel, stride, f"conv{i}")(x)
      last = i == len(layers)
      x = Norm(n, zero_init=last and self.zero_init, name=f"bn{i}")(x, is_training)
      if not last:
        x = jax.nn.relu(x)
    return jax.nn.relu(x + shortcut)


class ResNet(hk.Module):
  """ResNet v1 torso: images [N, H, W, 3] -> pooled embedding [N, D]."""

  def __init__(self, depth: int = 50, width: int = 1, stem: str = "imagenet",
               norm: str = "batch", zero_init_residual: bool = False,
               base_channels: int = 64, name: Optional[str] = "encoder"):
    super().__init__(name=name)
    if depth not in ARCHITECTURES:
      raise ValueError(f"ResNet depth {depth} is not supported; use one of {sorted(ARCHITECTURES)}.")
    if stem not in STEMS:
      raise ValueError(f"Unknown stem {stem!r}; use one of {STEMS}.")
    if norm not in NORMS:
      raise ValueError(f"Unknown norm {norm!r}; use one of {NORMS}.")
    if not (isinstance(width, int) and 1 <= width <= 4):
      raise ValueError(f"ResNet width multiplier must be an integer in 1..4, got {width!r}.")
    self.kind, self.stage_sizes = ARCHITECTURES[depth]
    self.width, self.stem, self.norm = width, stem, norm
    self.zero_init_residual = zero_init_residual
    # 64 is every standard ResNet; smaller values give narrow nets for CPU demos and tests.
    self.base = base_channels * width

  def __call__(self, x, is_training: bool):
    n = self.norm
    if self.stem == "imagenet":
      x = conv(n, self.base, 7, 2, "conv1")(x)
    else:
      x = conv(n, self.base, 3, 1, "conv1")(x)
    x = jax.nn.relu(Norm(n, name="bn1")(x, is_training))
    if self.stem == "imagenet":
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                ((0, 0), (1, 1), (1, 1), (0, 0)))
    expansion = 4 if self.kind == "bottleneck" else 1
    in_channels = self.base
    for stage, num_blocks in enumerate(self.stage_sizes):
      channels = self.base * 2**stage
      for b in range(num_blocks):
        stride = 2 if (stage > 0 and b == 0) else 1
        downsample = b == 0 and (stride != 1 or in_channels != channels * expansion)
        x = Block(self.kind, channels, stride, downsample, n, self.zero_init_residual,
                  name=f"layer{stage + 1}_{b}")(x, is_training)
        in_channels = channels * expansion
    return jnp.mean(x, axis=(1, 2))
