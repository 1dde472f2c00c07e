"""BYOL's image augmentations (paper, Table 6), split between host and device.

Host side (TensorFlow, inside tf.data; `random_resized_views`, `center_view`):
decode, random resized crop, resize to `data.image_size` and horizontal flip.
These change the image size, so they must run before images can be batched,
and decode-and-crop lets a JPEG decoder skip the pixels no view uses. The
host ships uint8 views.

Device side (pure JAX, inside the jitted update step; `device_augment`): colour
jitter, grayscale, Gaussian blur and solarize on the uint8 views. These are
elementwise passes and a small separable blur, cheap work for an accelerator,
while in TF on the host they would cost 2.2x everything else the 224 px host
path does (experiments/input_pipeline.md has the measurements behind this
split).

Every random choice is a pure function of a seed: host ops take a stateless TF
seed (shape [2]) built from (config.seed, stream position, view), device ops a
JAX key that `device_augment` splits into one key per example.

Every probability and strength comes from one view's config block
(`config.augment.view1` / `view2`, see configs/base.py); a probability of 0
removes the op from the compiled graph and 1 applies it always, so ablations
are config changes.
"""

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# ITU-R 601 luma weights, the usual RGB -> gray conversion (TF, PIL, torchvision).
_LUMA = (0.2989, 0.5870, 0.1140)
# Inception-style crops try this many (area, aspect) draws before falling back.
CROP_ATTEMPTS = 10
# The JPEG start-of-image marker; anything else goes to the generic decoder.
_JPEG_MAGIC = b"\xff\xd8\xff"

ViewConfig = Mapping[str, Any]


# ----------------------------------------------------------------------------
# TensorFlow import (host side only).
# ----------------------------------------------------------------------------

def import_tensorflow():
  """Returns the `tensorflow` module with every accelerator hidden from it.

  TF is imported lazily (it costs seconds) and must never take GPU/TPU memory
  that JAX needs; the input pipeline only runs CPU ops.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not getattr(import_tensorflow, "_done", False):
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
      # Devices were already initialised (someone used TF first) or this build
      # has no such device type; either way there is nothing left to hide.
      pass
    import_tensorflow._done = True
  return tf


# ----------------------------------------------------------------------------
# Host side: crops, flips and decoding in TensorFlow.
# ----------------------------------------------------------------------------

def sample_crop_window(seed, height, width, area_range, aspect_range,
                       attempts: int = CROP_ATTEMPTS):
  """An Inception-style random crop window `[y, x, h, w]` (int32) of an image.

  Draws `attempts` candidates at once, each with an area fraction uniform in
  `area_range` and an aspect ratio (w / h) log-uniform in `aspect_range`, and
  keeps the first that fits in the image. If none fits, takes the largest
  centred crop whose aspect ratio is clamped into `aspect_range`. Offsets are
  uniform over the positions where the window fits. Pure function of `seed`.
  """
  tf = import_tensorflow()
  area_seed, aspect_seed, y_seed, x_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area = h * w * tf.random.stateless_uniform(
      [attempts], area_seed, minval=area_range[0], maxval=area_range[1])
  log_ratio = tf.random.stateless_uniform(
      [attempts], aspect_seed, minval=math.log(aspect_range[0]),
      maxval=math.log(aspect_range[1]))
  ratio = tf.exp(log_ratio)
  crop_w = tf.round(tf.sqrt(area * ratio))
  crop_h = tf.round(tf.sqrt(area / ratio))
  fits = (crop_w >= 1) & (crop_h >= 1) & (crop_w <= w) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fit (0 if none)

  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
  image_ratio = w / h
  fallback_w = tf.where(image_ratio > aspect_range[1], tf.round(h * aspect_range[1]), w)
  fallback_h = tf.where(image_ratio < aspect_range[0], tf.round(w / aspect_range[0]), h)
  fallback_w = tf.clip_by_value(fallback_w, 1.0, w)
  fallback_h = tf.clip_by_value(fallback_h, 1.0, h)
  any_fit = tf.reduce_any(fits)
  ch = tf.where(any_fit, crop_h[first], fallback_h)
  cw = tf.where(any_fit, crop_w[first], fallback_w)

  # floor(u * (slack + 1)) is uniform over the slack + 1 possible offsets.
  uy = tf.random.stateless_uniform([], y_seed)
  ux = tf.random.stateless_uniform([], x_seed)
  y = tf.where(any_fit, tf.floor(uy * (h - ch + 1)), tf.floor((h - ch) / 2))
  x = tf.where(any_fit, tf.floor(ux * (w - cw + 1)), tf.floor((w - cw) / 2))
  y = tf.minimum(y, h - ch)  # u < 1, but guard float round-up at the edge
  x = tf.minimum(x, w - cw)
  return tf.cast(tf.stack([y, x, ch, cw]), tf.int32)


def center_crop_window(height, width, crop_fraction: float):
  """The centred square window `[y, x, s, s]` with s = crop_fraction * short side."""
  tf = import_tensorflow()
  short = tf.cast(tf.minimum(height, width), tf.float32)
  side = tf.cast(tf.maximum(tf.round(short * crop_fraction), 1.0), tf.int32)
  y = (height - side) // 2
  x = (width - side) // 2
  return tf.stack([y, x, side, side])


def is_jpeg(contents):
  """True (a scalar tf.bool) when the encoded bytes start with a JPEG marker."""
  tf = import_tensorflow()
  return tf.equal(tf.strings.substr(contents, 0, 3), _JPEG_MAGIC)


def decode_any(contents):
  """Any format TF reads (PNG 8/16-bit, GIF, BMP, WebP, JPEG) -> float32 RGB in [0, 255].

  decode_image with a float dtype scales 16-bit PNGs correctly (its uint8 mode
  does not), and channels=3 turns gray, palette and RGBA images into RGB.
  """
  tf = import_tensorflow()
  image = tf.io.decode_image(contents, channels=3, dtype=tf.float32, expand_animations=False)
  return image * 255.0


def _resize_window(image, window, origin, flip, size: int):
  """Cuts one [y, x, h, w] window out of `image` (whose top-left pixel sits at
  `origin` of the full image), resizes it to size x size and mirrors it if
  `flip`. Returns uint8 [size, size, 3].

  Bilinear without antialiasing: a third of the CPU cost of antialiased
  resizing (experiments/input_pipeline.md). Aliasing stays mild because for
  ImageNet-sized images a crop is at most ~1.7x the 224 px output.
  """
  tf = import_tensorflow()
  crop = tf.slice(image, tf.concat([window[:2] - origin, [0]], 0),
                  tf.concat([window[2:], [3]], 0))
  view = tf.image.resize(crop, [size, size], method="bilinear", antialias=False)
  view = tf.saturate_cast(tf.round(view), tf.uint8)
  return tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view)


def _decode_and_cut(contents, windows_fn, flips, size: int):
  """Decodes an image once and cuts every view out of it.

  `windows_fn(height, width)` returns the [V, 4] pixel windows. For JPEG only
  the union of the windows is decoded: decode-and-crop skips the IDCT and
  colour conversion outside it and stops after its last row (Huffman decoding
  of the rows above cannot be skipped, so the saving is ~10% for a 70% window
  of a ~100 KB JPEG). Returns uint8 [V, size, size, 3].
  """
  tf = import_tensorflow()
  num_views = flips.shape[0]

  def cut(image, origin, windows):
    return tf.stack([_resize_window(image, windows[v], origin, flips[v], size)
                     for v in range(num_views)])

  def jpeg():
    hw = tf.image.extract_jpeg_shape(contents)[:2]
    windows = windows_fn(hw[0], hw[1])
    top = tf.reduce_min(windows[:, :2], axis=0)
    bottom = tf.reduce_max(windows[:, :2] + windows[:, 2:], axis=0)
    image = tf.io.decode_and_crop_jpeg(contents, tf.concat([top, bottom - top], 0), channels=3)
    return cut(image, top, windows)

  def other():
    image = decode_any(contents)
    hw = tf.shape(image)[:2]
    return cut(image, tf.zeros([2], tf.int32), windows_fn(hw[0], hw[1]))

  return tf.cond(is_jpeg(contents), jpeg, other)


def random_resized_views(contents, seeds, view_configs, size: int):
  """Host-side views of one encoded image: random resized crop + flip per view.

  Args:
    contents: scalar tf.string, the encoded image (JPEG, PNG, GIF, BMP, WebP).
    seeds: int64 [V, 2] stateless seeds, one per view.
    view_configs: V view config blocks (crop_area, crop_aspect, flip_prob).
    size: output side in pixels.

  Returns:
    uint8 [V, size, size, 3].
  """
  tf = import_tensorflow()
  flips, crop_seeds = [], []
  for v, cfg in enumerate(view_configs):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[v], 2))
    crop_seeds.append(crop_seed)
    flips.append(tf.random.stateless_uniform([], flip_seed) < cfg["flip_prob"])

  def windows(height, width):
    return tf.stack([
        sample_crop_window(crop_seeds[v], height, width, cfg["crop_area"], cfg["crop_aspect"])
        for v, cfg in enumerate(view_configs)])

  return _decode_and_cut(contents, windows, tf.stack(flips), size)


def center_view(contents, size: int, crop_fraction: float):
  """Evaluation preprocessing: centred square crop of `crop_fraction` of the short
  side, resized to `size`. Returns uint8 [size, size, 3]."""
  tf = import_tensorflow()

  def windows(height, width):
    return center_crop_window(height, width, crop_fraction)[None]

  return _decode_and_cut(contents, windows, tf.zeros([1], tf.bool), size)[0]


# ----------------------------------------------------------------------------
# Device side: colour jitter, grayscale, blur, solarize in JAX.
# ----------------------------------------------------------------------------

def _gray(image):
  """[..., 3] -> [..., 1] luma.

  Written out per channel: a reduction over a size-3 minor axis does not fuse
  with its neighbours on XLA:CPU and was the slowest part of the jitter.
  """
  return (_LUMA[0] * image[..., 0:1] + _LUMA[1] * image[..., 1:2]
          + _LUMA[2] * image[..., 2:3])


def to_grayscale(image):
  return jnp.broadcast_to(_gray(image), image.shape)


def adjust_brightness(image, factor):
  """Blend with black: factor 0 -> black, 1 -> unchanged."""
  return image * factor


def adjust_contrast(image, factor):
  """Blend with the image's mean gray level."""
  mean = jnp.mean(_gray(image))
  return (image - mean) * factor + mean


def adjust_saturation(image, factor):
  """Blend with the grayscale image: factor 0 -> gray, 1 -> unchanged."""
  gray = _gray(image)
  return (image - gray) * factor + gray


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


def blur_kernel_radius(side: int) -> int:
  """Radius r of the blur kernel, whose side 2r + 1 is 10% of the image side made
  odd (224 -> 23, 96 -> 9, 32 -> 3)."""
  return max(1, int(side * 0.1) // 2)


def gaussian_blur(image, sigma, radius: int):
  """Separable Gaussian blur of one [H, W, C] image with reflected borders.

  Written as a weighted sum of shifted copies rather than a convolution: the
  kernel differs per example (sigma is random), and under vmap XLA turns a
  per-example convolution into a grouped one that is ~6x slower on CPU, while
  shifted adds fuse into a single elementwise loop on every backend.
  """
  offsets = jnp.arange(-radius, radius + 1, dtype=image.dtype)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  height, width = image.shape[0], image.shape[1]
  taps = 2 * radius + 1
  padded = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
  image = sum(kernel[i] * padded[i:i + height] for i in range(taps))
  padded = jnp.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
  return sum(kernel[i] * padded[:, i:i + width] for i in range(taps))


def solarize(image, threshold):
  """Inverts the pixels at or above `threshold`."""
  return jnp.where(image < threshold, image, 1.0 - image)


def _factor_range(strength):
  """torchvision's convention: a strength s means a factor in [max(0, 1 - s), 1 + s]."""
  return max(0.0, 1.0 - float(strength)), 1.0 + float(strength)


def sample_view_params(key, view_config: ViewConfig) -> dict:
  """Draws one example's device-side augmentation choices.

  Returns a dict of scalars: the booleans `jitter`, `grayscale`, `blur`,
  `solarize` (applied or not), the jitter factors `brightness`, `contrast`,
  `saturation`, `hue`, the jitter `order` (a permutation of 0..3 over
  brightness, contrast, saturation, hue) and the blur `sigma`.
  """
  keys = jax.random.split(key, 10)

  def coin(k, prob):
    # uniform is in [0, 1): prob 0 never fires, prob 1 always does.
    return jax.random.uniform(k) < prob

  def uniform(k, bounds):
    return jax.random.uniform(k, minval=bounds[0], maxval=bounds[1])

  hue = float(view_config["hue"])
  return dict(
      jitter=coin(keys[0], view_config["color_jitter_prob"]),
      brightness=uniform(keys[1], _factor_range(view_config["brightness"])),
      contrast=uniform(keys[2], _factor_range(view_config["contrast"])),
      saturation=uniform(keys[3], _factor_range(view_config["saturation"])),
      hue=uniform(keys[4], (-hue, hue)),
      order=jax.random.permutation(keys[5], 4),
      grayscale=coin(keys[6], view_config["grayscale_prob"]),
      blur=coin(keys[7], view_config["blur_prob"]),
      sigma=uniform(keys[8], view_config["blur_sigma"]),
      solarize=coin(keys[9], view_config["solarize_prob"]),
  )


_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE, _IDENTITY = 0, 1, 2, 3, 4


def _linear_step(image, op, params):
  """Brightness, contrast, saturation or identity (chosen per example by `op`).

  All three are x -> a*x + b*gray(x) + c*mean(gray(x)) with per-image scalars,
  so one evaluation covers whichever of them an example needs at this step.
  """
  factor = jnp.where(op == _BRIGHTNESS, params["brightness"],
                     jnp.where(op == _CONTRAST, params["contrast"], params["saturation"]))
  a = jnp.where(op == _IDENTITY, 1.0, factor)
  b = jnp.where(op == _SATURATION, 1.0 - factor, 0.0)
  c = jnp.where(op == _CONTRAST, 1.0 - factor, 0.0)
  gray = _gray(image)
  return jnp.clip(a * image + b * gray + c * jnp.mean(gray), 0.0, 1.0)


def color_jitter(image, params):
  """Brightness, contrast, saturation and hue in the order `params['order']`,
  clipping to [0, 1] after each (as torchvision's ColorJitter does).

  Exactly that sequence, arranged so that the expensive hue op is evaluated
  once: the ops before hue run as three linear steps (identity past the hue's
  place), then hue, then three linear steps for the ops after it. A plain
  per-step switch would evaluate every op (hue included) at every step under
  vmap, 4x the work.

  The linear steps run in `lax.scan`, whose carry XLA must materialise. Written
  as straight-line code, each step's image feeds both its contrast mean (a
  reduction) and the next step, and XLA:CPU fused and recomputed the chain
  inside every consumer; followed by the blur's shifted reads that made a
  224 px view 20x slower (see experiments/input_pipeline.md).
  """
  order = params["order"]
  hue_step = jnp.argmax(order == _HUE)
  before = jnp.where(jnp.arange(3) < hue_step, order[:3], _IDENTITY)
  after = jnp.where(jnp.arange(1, 4) > hue_step, order[1:], _IDENTITY)

  def step(x, op):
    return _linear_step(x, op, params), None

  image, _ = jax.lax.scan(step, image, before)
  image = jnp.clip(adjust_hue(image, params["hue"]), 0.0, 1.0)
  image, _ = jax.lax.scan(step, image, after)
  return image


def apply_view_params(image, params, view_config: ViewConfig):
  """One float [H, W, 3] image in [0, 1] -> its augmented view, given its params.

  Ops whose probability is 0 are left out of the graph altogether; for the
  others the op is computed and selected per example (vmap turns branches
  into selects anyway).
  """
  if view_config["color_jitter_prob"] > 0:
    image = jnp.where(params["jitter"], color_jitter(image, params), image)
  if view_config["grayscale_prob"] > 0:
    image = jnp.where(params["grayscale"], to_grayscale(image), image)
  if view_config["blur_prob"] > 0:
    radius = blur_kernel_radius(min(image.shape[0], image.shape[1]))
    image = jnp.where(params["blur"], gaussian_blur(image, params["sigma"], radius), image)
  if view_config["solarize_prob"] > 0:
    image = jnp.where(params["solarize"], solarize(image, view_config["solarize_threshold"]),
                      image)
  return image


def device_augment(images, key, view_config: ViewConfig):
  """Device-side augmentation of a batch of host views (pure JAX, jittable).

  Args:
    images: uint8 [B, H, W, 3] (or float in [0, 1]) views from the host pipeline.
    key: a JAX PRNG key for this batch and view. It is split into one key per
      example here, so an example's randomness depends only on the key and its
      row, never on how the batch is sharded over devices.
    view_config: the view's block, `config.augment.view1` or `view2`.

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
  params = jax.vmap(functools.partial(sample_view_params, view_config=view_config))(keys)
  apply = functools.partial(apply_view_params, view_config=view_config)
  return jnp.clip(jax.vmap(apply)(images, params), 0.0, 1.0)


def make_augment_fn(config) -> Callable[[jax.Array, jax.Array, int], jax.Array]:
  """`augment(images, key, view_index)` for `train_step.make_update_fn`.

  view_index 0 uses `config.augment.view1`, 1 uses `view2`. The view configs
  are read once here, outside any trace.
  """
  views = (config.augment.view1, config.augment.view2)

  def augment(images, key, view_index: int):
    return device_augment(images, key, views[view_index])

  return augment
