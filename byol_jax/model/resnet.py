"""ResNet v1 encoders (torchvision layout) in Haiku.

Our own torso rather than `hk.nets.ResNet`, for three reasons: Haiku's hard-codes
the stem max-pool and a logits layer; it has no GroupNorm + Weight
Standardisation variant; and its "SAME" padding is asymmetric at stride 2 (one
pixel more at the bottom/right), which torchvision cannot express. The default
`padding="torchvision"` pads symmetrically, as torchvision does;
`padding="haiku_same"` pads as Haiku does, to run DeepMind's released BYOL
weights (see `reference_checkpoint.py`).

Module names follow torchvision (`conv1`, `bn1`, `layer1_0`, `downsample_conv`,
...) so that the torchvision export is a plain renaming. `layout` is the one
statement of the block structure; the network and the export both read it.
"""

import functools
from typing import NamedTuple, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp

from byol_jax.errors import ConfigError

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
MAX_POOLS = ("auto", "slices", "reduce_window")
STEMS = ("imagenet", "cifar")
PADDINGS = ("torchvision", "haiku_same")
MAX_WIDTH = 4
WS_EPS = 1e-10  # weight standardisation's variance epsilon (the export folds it in too)


class BlockSpec(NamedTuple):
  """One residual block: where it sits, its widths, stride and shortcut."""
  stage: int          # 0..3 (torchvision's layer1..layer4)
  index: int          # position in its stage
  kind: str           # "basic" | "bottleneck"
  in_channels: int
  channels: int       # width of the inner convolutions
  out_channels: int
  stride: int         # on the 3x3 convolution ("v1.5") and on the shortcut
  downsample: bool    # projection shortcut (1x1 conv + norm) iff the shape changes

  @property
  def name(self) -> str:
    return f"layer{self.stage + 1}_{self.index}"


def check_architecture(depth, width, stem: str, norm: str, padding: str,
                       base_channels: int = 64) -> None:
  """Raises a ConfigError naming the config field to change if `ResNet` cannot build this."""
  if depth not in ARCHITECTURES:
    raise ConfigError(f"ResNet depth {depth!r} is not supported: model.depth must be one of "
                      f"{sorted(ARCHITECTURES)}.")
  if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
    raise ConfigError(f"ResNet width {width!r} is not supported: model.width must be an "
                      f"integer in 1..{MAX_WIDTH}.")
  if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels < 1:
    raise ConfigError(f"base_channels {base_channels!r} is not supported: "
                      "model.base_channels must be a positive integer (64 for standard ResNets).")
  for field, value, choices in (("stem", stem, STEMS), ("norm", norm, NORMS),
                                ("padding", padding, PADDINGS)):
    if value not in choices:
      raise ConfigError(f"Unknown {field} {value!r}: model.{field} must be one of {choices}.")


def layout(depth: int, width: int = 1, base_channels: int = 64) -> Tuple[BlockSpec, ...]:
  """Every residual block of the encoder, in order."""
  kind, stage_sizes = ARCHITECTURES[depth]
  expansion = 4 if kind == "bottleneck" else 1
  stem_channels = base_channels * width
  blocks, in_channels = [], stem_channels
  for stage, num_blocks in enumerate(stage_sizes):
    channels = stem_channels * 2**stage
    for index in range(num_blocks):
      stride = 2 if (stage > 0 and index == 0) else 1
      out_channels = channels * expansion
      blocks.append(BlockSpec(stage, index, kind, in_channels, channels, out_channels, stride,
                              downsample=stride != 1 or in_channels != out_channels))
      in_channels = out_channels
  return tuple(blocks)


def embedding_dim(depth: int, width: int = 1, base_channels: int = 64) -> int:
  return layout(depth, width, base_channels)[-1].out_channels


class Conv2D(hk.Conv2D):
  """`hk.Conv2D` (same parameter "w", HWIO), with 1x1 kernels run as a matmul and
  optional weight standardisation (Qiao et al. 2019: per output channel).

  A 1x1 convolution is a matmul over channels, after striding. On XLA:CPU the
  dot and its gradients run faster than the convolution, and so does ResNet-50's
  whole update step (measurements: experiments/speed.md, `benchmarks/bench_ops.py`);
  the result is the same up to float rounding.
  """

  def __init__(self, *args, standardize: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self.standardize = standardize

  def __call__(self, inputs):
    w_shape = (*self.kernel_shape, inputs.shape[-1], self.output_channels)
    w = hk.get_parameter("w", w_shape, inputs.dtype, init=self.w_init)
    if self.standardize:
      mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
      var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
      w = (w - mean) * jax.lax.rsqrt(var + WS_EPS)
    if self.kernel_shape == (1, 1):  # no padding at any stride, "SAME" or torchvision's
      return pointwise_conv(inputs, w, self.stride)
    return jax.lax.conv_general_dilated(
        inputs, w, window_strides=self.stride, padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pointwise_conv(x, w, stride):
  """A 1x1 convolution (NHWC input, HWIO kernel, no padding) as a matmul over channels."""
  sh, sw = stride
  return jnp.einsum("nhwc,cd->nhwd", x[:, ::sh, ::sw], w[0, 0])


def max_pool_3x3_s2(x, padding: str, how: str = "auto"):
  """The stem's 3x3 stride-2 max-pool. `how` "auto": `max_pool_slices` on CPU,
  `max_pool_reduce_window` on other platforms, chosen when the step is lowered
  (`lax.platform_dependent`); "slices" or "reduce_window": that one everywhere.

  Same values either way. On TPU the slices' gradient holds eight boolean masks and
  nine padded partial sums at the stem's resolution, a large share of ResNet-50's
  HBM traffic per step (experiments/tpu_scale.md); reduce_window's
  select-and-scatter is one pass.
  """
  slices = functools.partial(max_pool_slices, padding=padding)
  reduce_window = functools.partial(max_pool_reduce_window, padding=padding)
  if how == "auto":
    return jax.lax.platform_dependent(x, cpu=slices, default=reduce_window)
  return {"slices": slices, "reduce_window": reduce_window}[how](x)


def _pool_pads(shape, padding: str):
  # Output ceil(n / 2) either way. torchvision pads one pixel each side; "SAME"
  # (Haiku) pads the odd pixel after, so an even side gets none before.
  return [(1 if padding == "torchvision" or size % 2 else 0, 1) for size in shape[1:3]]


def max_pool_slices(x, padding: str):
  """The max-pool as the maximum of nine strided slices.

  Its gradient is elementwise selects, where `lax.reduce_window`'s is a
  select-and-scatter, slower on XLA:CPU (experiments/speed.md, `benchmarks/bench_ops.py`). Same values; the gradient differs only where two
  inputs of a window tie exactly, which it splits instead of giving to the
  first (after a ReLU, ties at zero get no gradient either way).
  """
  out_h, out_w = ((size + 1) // 2 for size in x.shape[1:3])
  x = jnp.pad(x, ((0, 0), *_pool_pads(x.shape, padding), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      tap = x[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2]
      out = tap if out is None else jnp.maximum(out, tap)
  return out


def max_pool_reduce_window(x, padding: str):
  """The max-pool as one `lax.reduce_window`."""
  pads = ((0, 0), *_pool_pads(x.shape, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)


class BatchNorm(hk.BatchNorm):
  """`hk.BatchNorm` (the same parameters and state) whose batch may interleave `views`
  views of each example (rows e * views + v), each normalised with its own statistics
  and each updating the moving averages in turn, as `views` separate batches would.
  """

  def __call__(self, inputs, is_training: bool, views: int = 1):
    if views == 1 or not is_training:
      return super().__call__(inputs, is_training)
    x = inputs.reshape(-1, views, *inputs.shape[1:])
    axes = tuple(i for i in range(x.ndim) if i not in (1, x.ndim - 1))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x), axes, keepdims=True) - jnp.square(mean)
    for v in range(views):
      self.mean_ema(mean[:, v])
      self.var_ema(var[:, v])
    w_shape = (1,) * (inputs.ndim - 1) + inputs.shape[-1:]
    scale = hk.get_parameter("scale", w_shape, inputs.dtype, self.scale_init)
    offset = hk.get_parameter("offset", w_shape, inputs.dtype, self.offset_init)
    out = (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + offset
    return out.reshape(inputs.shape)


def batch_norm(x, is_training: bool, scale_init=jnp.ones, name: str = "bn", views: int = 1):
  """BatchNorm computed in at least float32 whatever the compute dtype (float64 stays
  float64), per view (`BatchNorm`).

  It takes the variance as E[x^2] - E[x]^2, which cancels catastrophically in
  bfloat16 (NaN losses within tens of steps); float32 statistics are the usual
  mixed-precision rule. Under jit with a batch-sharded input the mean over the
  batch is already a global (cross-replica) mean: XLA inserts the all-reduce.
  """
  y = BatchNorm(True, True, BN_DECAY, eps=BN_EPS, scale_init=scale_init, name=name)(
      x.astype(jnp.promote_types(x.dtype, jnp.float32)), is_training, views)
  return y.astype(x.dtype)


class Norm(hk.Module):
  """BatchNorm or GroupNorm, chosen by name; `is_training` is ignored by GN."""

  def __init__(self, norm: str, zero_init: bool = False, name: Optional[str] = None):
    super().__init__(name=name)
    self.norm = norm
    self.scale_init = jnp.zeros if zero_init else jnp.ones

  def __call__(self, x, is_training: bool, views: int = 1):
    if self.norm == "batch":
      return batch_norm(x, is_training, self.scale_init, views=views)
    groups = min(32, x.shape[-1])  # narrow (base_channels < 64) nets have fewer channels
    return hk.GroupNorm(groups=groups, eps=BN_EPS, scale_init=self.scale_init, name="gn")(x)


def conv(norm: str, channels: int, kernel: int, stride: int, name: str,
         padding: str = "torchvision"):
  pad = kernel // 2
  # "SAME" (Haiku, TF) pads for an output of ceil(n / stride), any odd pixel after. For
  # these odd kernels that is torchvision's kernel // 2 on both sides, except at stride 2
  # on an even n, where it pads one pixel less before.
  pads = "SAME" if padding == "haiku_same" else ((pad, pad), (pad, pad))
  return Conv2D(channels, kernel, stride=stride, padding=pads, with_bias=False,
                w_init=hk.initializers.VarianceScaling(2.0, "fan_out", "normal"),
                standardize=norm == "group_ws", name=name)


class Block(hk.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block, stride on the 3x3.

  The same block as `hk.nets.ResNet`'s BlockV1 with `bottleneck=True`, which
  also strides its 3x3 (`conv_1`).
  """

  def __init__(self, spec: BlockSpec, norm: str, padding: str, zero_init_residual: bool):
    super().__init__(name=spec.name)
    self.spec, self.norm, self.padding = spec, norm, padding
    self.zero_init = zero_init_residual

  def __call__(self, x, is_training, views: int = 1):
    c, s = self.spec.channels, self.spec.stride
    if self.spec.kind == "basic":
      layers = [(c, 3, s), (c, 3, 1)]
    else:
      layers = [(c, 1, 1), (c, 3, s), (self.spec.out_channels, 1, 1)]
    conv_ = lambda *args: conv(self.norm, *args, padding=self.padding)
    shortcut = x
    if self.spec.downsample:
      shortcut = conv_(self.spec.out_channels, 1, s, "downsample_conv")(x)
      shortcut = Norm(self.norm, name="downsample_norm")(shortcut, is_training, views)
    for i, (channels, kernel, stride) in enumerate(layers, start=1):
      x = conv_(channels, kernel, stride, f"conv{i}")(x)
      last = i == len(layers)
      x = Norm(self.norm, zero_init=last and self.zero_init, name=f"bn{i}")(x, is_training,
                                                                              views)
      if not last:
        x = jax.nn.relu(x)
    return jax.nn.relu(x + shortcut)


class ResNet(hk.Module):
  """ResNet v1 torso: images [N, H, W, 3] -> pooled embedding [N, D]; BatchNorm statistics
  per view when the N rows interleave `views` views of N / views examples."""

  def __init__(self, depth: int = 50, width: int = 1, stem: str = "imagenet",
               norm: str = "batch", zero_init_residual: bool = False,
               base_channels: int = 64, padding: str = "torchvision", remat: bool = False,
               max_pool: str = "auto", name: Optional[str] = "encoder"):
    super().__init__(name=name)
    if max_pool not in MAX_POOLS:
      raise ConfigError(f"Unknown max_pool {max_pool!r}: model.max_pool must be one of "
                        f"{MAX_POOLS}.")
    self.remat, self.max_pool = remat, max_pool
    check_architecture(depth, width, stem, norm, padding, base_channels)
    # 64 is every standard ResNet; smaller values give narrow nets for CPU demos and tests.
    self.blocks = layout(depth, width, base_channels)
    self.stem_channels = base_channels * width
    self.stem, self.norm, self.padding = stem, norm, padding
    self.zero_init_residual = zero_init_residual

  def __call__(self, x, is_training: bool, views: int = 1):
    n, p = self.norm, self.padding
    if self.stem == "imagenet":
      x = conv(n, self.stem_channels, 7, 2, "conv1", p)(x)
    else:
      x = conv(n, self.stem_channels, 3, 1, "conv1", p)(x)
    x = jax.nn.relu(Norm(n, name="bn1")(x, is_training, views))
    if self.stem == "imagenet":
      x = max_pool_3x3_s2(x, p, self.max_pool)
    for spec in self.blocks:
      block = Block(spec, n, p, self.zero_init_residual)
      # remat: keep only each block's input for the backward pass and recompute the rest
      # there (the same values, a third more FLOPs, far fewer bytes held).
      run = hk.remat(block, static_argnums=(1, 2)) if self.remat else block
      x = run(x, is_training, views)
    return jnp.mean(x, axis=(1, 2))
