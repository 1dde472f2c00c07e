"""Device-side augmentation in JAX, inside the jitted update step.

Colour jitter, grayscale, Gaussian blur and solarize (BYOL paper, Table 6) on
the host's views: elementwise passes and a small separable blur, cheap work for
an accelerator (experiments/input_pipeline.md has the measurements behind the
host/device split). `device_augment` splits its JAX key into one key per
example, so an example's randomness never depends on the sharding.

Two colour semantics (`config.augment.color`, resolved by
`configs.base.resolve_augment`):

* "tf_image", the released BYOL code's (byol/utils/augmentations.py, which
  follows tf.image): brightness adds a delta, contrast scales each channel
  around its own mean, saturation scales HSV saturation and clips it to
  [0, 1], and the blur pads with zeros ('SAME' convolution).
* "torchvision", torchvision's ColorJitter (SimCLR): brightness, contrast and
  saturation blend with black, the mean gray level and the gray image, and the
  blur reflects at the borders.

Hue, grayscale, solarize, the random jitter order, the clipping after every
jitter op and the probabilities are the same in both. Every probability and
strength comes from one view's config block (`config.augment.view1` /
`view2`); a probability of 0 removes the op from the compiled graph, so
ablations are config changes.

The tf_image ops are written by hand rather than taken from dm-pix (DeepMind's
JAX image library, whose ops and blur are the reference's): they agree with
dm-pix and run a whole view faster on XLA:CPU, since dm-pix's per-op HSV round
trips and per-example convolutions do not fit the hue-once scan and shifted-add
blur below (measurements: experiments/speed.md, "Colour ops: hand-written vs
dm-pix"; `benchmarks/bench_color_ops.py`).
"""

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from byol_jax.errors import ConfigError
from byol_jax.configs import base

# ITU-R 601 luma weights, the usual RGB -> gray conversion (TF, PIL, torchvision).
_LUMA = (0.2989, 0.5870, 0.1140)
COLOR_STYLES = ("tf_image", "torchvision")

ViewConfig = Mapping[str, Any]


def _gray(image):
  """[..., 3] -> [..., 1] luma.

  Written out per channel: a reduction over a size-3 minor axis does not fuse
  with its neighbours on XLA:CPU and was the slowest part of the jitter.
  """
  return (_LUMA[0] * image[..., 0:1] + _LUMA[1] * image[..., 1:2]
          + _LUMA[2] * image[..., 2:3])


def _max_min(image):
  """Per-pixel max and min over the channels, [..., 1] each (unrolled, as `_gray`)."""
  r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  return jnp.maximum(jnp.maximum(r, g), b), jnp.minimum(jnp.minimum(r, g), b)


def to_grayscale(image):
  return jnp.broadcast_to(_gray(image), image.shape)


# tf.image semantics (the reference).

def adjust_brightness(image, delta):
  """tf.image.adjust_brightness: adds `delta` to every channel."""
  return image + delta


def adjust_contrast(image, factor):
  """tf.image.adjust_contrast: each channel scaled by `factor` around its own mean."""
  mean = jnp.mean(image, axis=(-3, -2), keepdims=True)
  return (image - mean) * factor + mean


def _saturation_scale(image, factor):
  """Per-pixel k with adjust_saturation(x) = v - (v - x) * k, [..., 1].

  In HSV, value v = max channel and chroma c = v * s = max - min; each channel
  is v - c * ramp(hue). Scaling s by `factor` and clipping it to [0, 1] keeps
  v and hue and makes the chroma clip(c * factor, 0, v), so every channel's
  distance below v scales by clip(c * factor, 0, v) / c. No hue is computed.
  """
  top, bottom = _max_min(image)
  chroma = top - bottom
  safe = jnp.where(chroma > 0, chroma, 1.0)
  return jnp.where(chroma > 0, jnp.clip(chroma * factor, 0.0, top) / safe, 1.0), top


def adjust_saturation(image, factor):
  """tf.image.adjust_saturation: RGB -> HSV, S * factor clipped to [0, 1], -> RGB."""
  scale, top = _saturation_scale(image, factor)
  return top - (top - image) * scale


def adjust_hue(image, delta):
  """Rotates the HSV hue by `delta` of a full turn, keeping HSV value and saturation.

  Works on the piecewise-linear HSV hexcone directly: value = max channel,
  value * saturation = chroma = max - min, so no saturation division is needed.
  The hue sector comes from comparisons between channels, never from
  `max == channel`: XLA may fuse and recompute the channels with different
  rounding (FMA contraction) on either side of such an equality, and then no
  sector matches (seen on XLA:CPU with batched inputs).
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  r_top = (r >= g) & (r >= b)
  g_top = ~r_top & (g >= b)
  top = jnp.where(r_top, r, jnp.where(g_top, g, b))
  chroma = jnp.maximum(top - jnp.minimum(jnp.minimum(r, g), b), 0.0)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn; which channel is the maximum picks the sector.
  sixths = jnp.where(r_top, (g - b) / safe,
                     jnp.where(g_top, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  sixths = sixths + 6.0 * delta
  sixths = sixths - 6.0 * jnp.floor(sixths / 6.0)
  # HSV -> RGB: channel n (5 for r, 3 for g, 1 for b) = top - chroma * ramp(k).
  k = jnp.asarray([5.0, 3.0, 1.0], image.dtype) + sixths[..., None]
  k = jnp.where(k >= 6.0, k - 6.0, k)
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return top[..., None] - chroma[..., None] * ramp


# torchvision semantics (the alternative).

def torchvision_brightness(image, factor):
  """Blend with black: factor 0 -> black, 1 -> unchanged."""
  return image * factor


def torchvision_contrast(image, factor):
  """Blend with the image's mean gray level."""
  mean = jnp.mean(_gray(image))
  return (image - mean) * factor + mean


def torchvision_saturation(image, factor):
  """Blend with the grayscale image: factor 0 -> gray, 1 -> unchanged."""
  gray = _gray(image)
  return (image - gray) * factor + gray


def blur_kernel_radius(side: int) -> int:
  """The reference's radius int(side / 10 / 2): 224 -> 11 (23 taps), 96 -> 4,
  32 -> 1, and 0 (no blur) below 20 px."""
  return int(side) // 20


def gaussian_blur(image, sigma, radius: int, padding: str = "zero"):
  """Separable Gaussian blur of one [H, W, C] image; borders padded with zeros
  (the reference's 'SAME' convolution) or reflected (torchvision).

  Written as a weighted sum of shifted copies rather than a convolution: the
  kernel differs per example (sigma is random), and under vmap XLA turns a
  per-example convolution into a grouped one that is ~6x slower on CPU, while
  shifted adds fuse into a single elementwise loop on every backend.
  """
  offsets = jnp.arange(-radius, radius + 1, dtype=image.dtype)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  mode = {"zero": "constant", "reflect": "reflect"}[padding]
  height, width = image.shape[0], image.shape[1]
  taps = 2 * radius + 1
  padded = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode=mode)
  image = sum(kernel[i] * padded[i:i + height] for i in range(taps))
  padded = jnp.pad(image, ((0, 0), (radius, radius), (0, 0)), mode=mode)
  return sum(kernel[i] * padded[:, i:i + width] for i in range(taps))


def solarize(image, threshold):
  """Inverts the pixels at or above `threshold`."""
  return jnp.where(image < threshold, image, 1.0 - image)


def _jitter_ranges(view_config: ViewConfig, color: str) -> dict:
  """The (low, high) range each jitter parameter is drawn from, per colour style."""
  strength = {op: float(view_config[op]) for op in ("brightness", "contrast", "saturation", "hue")}
  if color == "tf_image":  # the reference: U[-s, s] for the delta, U[1 - s, 1 + s] factors
    factor = lambda s: (1.0 - s, 1.0 + s)
    brightness = (-strength["brightness"], strength["brightness"])
  elif color == "torchvision":  # factors in [max(0, 1 - s), 1 + s]
    factor = lambda s: (max(0.0, 1.0 - s), 1.0 + s)
    brightness = factor(strength["brightness"])
  else:
    raise ConfigError(f"Unknown colour style {color!r}; set config.augment.color to one of "
                      f"{COLOR_STYLES}.")
  return dict(brightness=brightness, contrast=factor(strength["contrast"]),
              saturation=factor(strength["saturation"]),
              hue=(-strength["hue"], strength["hue"]))


def sample_view_params(key, view_config: ViewConfig, color: str = "tf_image") -> dict:
  """Draws one example's device-side augmentation choices.

  Returns a dict of scalars: the booleans `jitter`, `grayscale`, `blur`,
  `solarize` (applied or not), the jitter parameters `brightness` (a delta
  for tf_image, a factor for torchvision), `contrast`, `saturation`, `hue`,
  the jitter `order` (a permutation of 0..3 over brightness, contrast,
  saturation, hue) and the blur `sigma`.
  """
  keys = jax.random.split(key, 10)
  ranges = _jitter_ranges(view_config, color)

  def coin(k, prob):
    # uniform is in [0, 1): prob 0 never fires, prob 1 always does.
    return jax.random.uniform(k) < prob

  def uniform(k, bounds):
    return jax.random.uniform(k, minval=bounds[0], maxval=bounds[1])

  return dict(
      jitter=coin(keys[0], view_config["color_jitter_prob"]),
      brightness=uniform(keys[1], ranges["brightness"]),
      contrast=uniform(keys[2], ranges["contrast"]),
      saturation=uniform(keys[3], ranges["saturation"]),
      hue=uniform(keys[4], ranges["hue"]),
      order=jax.random.permutation(keys[5], 4),
      grayscale=coin(keys[6], view_config["grayscale_prob"]),
      blur=coin(keys[7], view_config["blur_prob"]),
      sigma=uniform(keys[8], view_config["blur_sigma"]),
      solarize=coin(keys[9], view_config["solarize_prob"]),
  )


_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE, _IDENTITY = 0, 1, 2, 3, 4


def _tf_image_step(image, op, params):
  """Brightness, contrast, saturation or identity, chosen per example by `op`.

  All are x -> a * (v - (v - x) * k) + c * mean_channel(x) + d with per-image
  scalars a, c, d and the per-pixel saturation scale k, so one evaluation
  covers whichever of them an example needs at this step.
  """
  factor = jnp.where(op == _CONTRAST, params["contrast"], params["saturation"])
  scale, top = _saturation_scale(image, factor)
  k = jnp.where(op == _SATURATION, scale, 1.0)
  a = jnp.where(op == _CONTRAST, factor, 1.0)
  c = jnp.where(op == _CONTRAST, 1.0 - factor, 0.0)
  d = jnp.where(op == _BRIGHTNESS, params["brightness"], 0.0)
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  return jnp.clip(a * (top - (top - image) * k) + c * mean + d, 0.0, 1.0)


def _torchvision_step(image, op, params):
  """As `_tf_image_step` for torchvision's ops: all three are
  x -> a * x + b * gray(x) + c * mean(gray(x)) with per-image scalars."""
  factor = jnp.where(op == _BRIGHTNESS, params["brightness"],
                     jnp.where(op == _CONTRAST, params["contrast"], params["saturation"]))
  a = jnp.where(op == _IDENTITY, 1.0, factor)
  b = jnp.where(op == _SATURATION, 1.0 - factor, 0.0)
  c = jnp.where(op == _CONTRAST, 1.0 - factor, 0.0)
  gray = _gray(image)
  return jnp.clip(a * image + b * gray + c * jnp.mean(gray), 0.0, 1.0)


_STEPS = {"tf_image": _tf_image_step, "torchvision": _torchvision_step}


def color_jitter(image, params, color: str = "tf_image"):
  """Brightness, contrast, saturation and hue in the order `params['order']`,
  clipping to [0, 1] after each (as the reference and torchvision both do).

  Exactly that sequence, arranged so that the expensive hue op is evaluated
  once: the ops before hue run as three linear steps (identity past the hue's
  place), then hue, then three linear steps for the ops after it. A plain
  per-step switch would evaluate every op (hue included) at every step under
  vmap, 4x the work.

  The linear steps run in `lax.scan`, whose carry XLA must materialise. Written
  as straight-line code, each step's image feeds both its mean (a reduction)
  and the next step, and XLA:CPU fused and recomputed the chain inside every
  consumer; followed by the blur's shifted reads that made a 224 px view 20x
  slower (see experiments/input_pipeline.md).
  """
  order = params["order"]
  hue_step = jnp.argmax(order == _HUE)
  before = jnp.where(jnp.arange(3) < hue_step, order[:3], _IDENTITY)
  after = jnp.where(jnp.arange(1, 4) > hue_step, order[1:], _IDENTITY)
  linear_step = _STEPS[color]

  def step(x, op):
    return linear_step(x, op, params), None

  image, _ = jax.lax.scan(step, image, before)
  image = jnp.clip(adjust_hue(image, params["hue"]), 0.0, 1.0)
  image, _ = jax.lax.scan(step, image, after)
  return image


def apply_view_params(image, params, view_config: ViewConfig, color: str = "tf_image"):
  """One float [H, W, 3] image in [0, 1] -> its augmented view, given its params.

  Ops whose probability is 0 are left out of the graph altogether; for the
  others the op is computed and selected per example (vmap turns branches
  into selects anyway).
  """
  if view_config["color_jitter_prob"] > 0:
    image = jnp.where(params["jitter"], color_jitter(image, params, color), image)
  if view_config["grayscale_prob"] > 0:
    image = jnp.where(params["grayscale"], to_grayscale(image), image)
  radius = blur_kernel_radius(image.shape[0])
  if view_config["blur_prob"] > 0 and radius > 0:
    padding = "zero" if color == "tf_image" else "reflect"
    image = jnp.where(params["blur"], gaussian_blur(image, params["sigma"], radius, padding),
                      image)
  if view_config["solarize_prob"] > 0:
    image = jnp.where(params["solarize"], solarize(image, view_config["solarize_threshold"]),
                      image)
  return image


def device_augment(images, key, view_config: ViewConfig, color: str = "tf_image"):
  """Device-side augmentation of a batch of host views (pure JAX, jittable).

  Args:
    images: uint8 [B, H, W, 3], or float (float16 from the bicubic host path)
      in [0, 1].
    key: a JAX PRNG key for this batch and view. It is split into one key per
      example here, so an example's randomness depends only on the key and its
      row, never on how the batch is sharded over devices.
    view_config: the view's block, `config.augment.view1` or `view2`.
    color: the colour semantics, "tf_image" (the reference) or "torchvision".

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"device_augment expects [B, H, W, 3] images, got shape {images.shape}.")
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  else:
    images = images.astype(jnp.float32)
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(functools.partial(sample_view_params, view_config=view_config,
                                      color=color))(keys)
  apply = functools.partial(apply_view_params, view_config=view_config, color=color)
  return jnp.clip(jax.vmap(apply)(images, params), 0.0, 1.0)


def make_augment_fn(config) -> Callable[[jax.Array, jax.Array, int], jax.Array]:
  """`augment(images, key, view_index)` for `train_step.make_update_fn`.

  view_index 0 uses `config.augment.view1`, 1 uses `view2`; the colour style
  is `config.augment`'s. Both are read once here, outside any trace.
  """
  views = (config.augment.view1, config.augment.view2)
  color = base.resolve_augment(config.augment)["color"]

  def augment(images, key, view_index: int):
    return device_augment(images, key, views[view_index], color)

  return augment
