"""The random resized crop, resize and flip on the device, for in-memory images.

For sources held as equal-sized uint8 arrays (`data.sources.ArraySource`) the host
only gathers rows; this module cuts the views inside the jitted step, batched
and per example, with the host path's distributions (`host_augment`): the
window in `config.augment`'s crop style (the reference's one draw,
`crop_windows.crop_window_params`, or the Inception crop with 10 tries and a
centre fallback) and its resize method (TF's bicubic or bilinear, half-pixel
centres, no antialiasing; bicubic clipped to [0, 1]).

A window is resized as two small matrices per example: out = Wy @ image @
Wx^T, with the flip folded into Wx. Matmuls run well on every backend, and
the per-example windows need no dynamic shapes. Views come out as float32 in
[0, 1] (bilinear ones are not rounded to uint8 as the host's are).

Randomness: each example carries a threefry key (`crop_seed`, uint32 [.., 2]
per view) that the host derives from (config.seed, stream position, view), so
a view depends only on its example's place in the stream, never on the batch
layout, the device count or the process count.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.errors import ConfigError
from byol_jax.configs import base
from byol_jax.views import crop_windows

CROP_ATTEMPTS = 10  # Inception-style crops: draws before the centre fallback, as the host
_KEYS_CUBIC_A = -0.5  # TF's bicubic resize with half-pixel centres uses Keys' kernel


def reference_window(key, height: int, width: int, area_range, aspect_range):
  """The reference's one-draw window (y, x, h, w), float32 scalars holding integers."""
  u = jax.random.uniform(key, (4,))
  return crop_windows.crop_window_params(u[0], u[1], u[2], u[3], float(height), float(width),
                                         area_range, aspect_range, xp=jnp)


def inception_window(key, height: int, width: int, area_range, aspect_range):
  """The Inception crop (`host_augment.inception_crop_window`): the first of
  CROP_ATTEMPTS draws that fits, else the whole image narrowed into aspect_range."""
  area_key, ratio_key, offset_key = jax.random.split(key, 3)
  area = height * width * jax.random.uniform(area_key, (CROP_ATTEMPTS,), minval=area_range[0],
                                             maxval=area_range[1])
  ratio = jnp.exp(jax.random.uniform(ratio_key, (CROP_ATTEMPTS,),
                                     minval=math.log(aspect_range[0]),
                                     maxval=math.log(aspect_range[1])))
  w, h = jnp.round(jnp.sqrt(area * ratio)), jnp.round(jnp.sqrt(area / ratio))
  fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
  first, any_fit = jnp.argmax(fits), jnp.any(fits)
  fallback_w, fallback_h = width, height  # static: the image size is known at trace time
  if width / height > aspect_range[1]:
    fallback_w = min(max(round(height * aspect_range[1]), 1), width)
  if width / height < aspect_range[0]:
    fallback_h = min(max(round(width / aspect_range[0]), 1), height)
  h = jnp.where(any_fit, h[first], fallback_h)
  w = jnp.where(any_fit, w[first], fallback_w)
  u = jax.random.uniform(offset_key, (2,))
  y = jnp.where(any_fit, jnp.minimum(jnp.floor(u[0] * (height - h + 1)), height - h),
                jnp.floor((height - h) / 2))
  x = jnp.where(any_fit, jnp.minimum(jnp.floor(u[1] * (width - w + 1)), width - w),
                jnp.floor((width - w) / 2))
  return y, x, h, w


WINDOWS = {"reference": reference_window, "inception": inception_window}


def center_window(height: int, width: int, crop_fraction: float):
  """The host's centred square window (y, x, s, s): s = floor(crop_fraction x the
  short side) in float32, offsets rounded up."""
  side = max(int(np.float32(crop_fraction) * np.float32(min(height, width))), 1)
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def _keys_cubic(d):
  d = jnp.abs(d)
  a = _KEYS_CUBIC_A
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return jnp.where(d <= 1, near, jnp.where(d < 2, far, 0.0))


def _resize_matrix(start, length, in_size: int, out_size: int, resize: str, reverse=False):
  """[out_size, in_size] weights resampling pixels [start, start + length) to out_size.

  TF's kernels with half-pixel centres: output i samples the window at
  (i + 0.5) * length / out_size - 0.5. Bilinear clamps that into the window;
  bicubic gives taps outside the window weight 0 and renormalises.
  """
  out = jnp.arange(out_size, dtype=jnp.float32)
  out = jnp.where(reverse, out_size - 1 - out, out)
  src = (out + 0.5) * (length / out_size) - 0.5
  local = jnp.arange(in_size, dtype=jnp.float32) - start  # pixel positions in the window
  if resize == "bilinear":
    src = jnp.clip(src, 0.0, length - 1.0)
    return jnp.maximum(0.0, 1.0 - jnp.abs(src[:, None] - local[None, :]))
  if resize != "bicubic":
    raise ConfigError(f"Unknown resize method {resize!r}; set config.augment.resize to "
                      "'bicubic' or 'bilinear'.")
  inside = (local >= 0) & (local <= length - 1)
  weights = jnp.where(inside[None, :], _keys_cubic(src[:, None] - local[None, :]), 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def resize_window(image, window, flip, size: int, resize: str):
  """One uint8 [H, W, 3] image -> float32 [size, size, 3] in [0, 1]: the window
  (y, x, h, w) resized, and mirrored when `flip`."""
  y, x, h, w = window
  height, width = image.shape[0], image.shape[1]
  rows = _resize_matrix(y, h, height, size, resize) / 255.0  # the scale to [0, 1] rides along
  cols = _resize_matrix(x, w, width, size, resize, reverse=flip)
  view = jnp.einsum("tw,swc->stc", cols, jnp.einsum("sh,hwc->swc", rows,
                                                    image.astype(jnp.float32)))
  return jnp.clip(view, 0.0, 1.0) if resize == "bicubic" else view


def random_views(images, keys, view_config, size: int, crop: str = "reference",
                 resize: str = "bicubic"):
  """Random resized crop + flip of a batch: uint8 [B, H, W, 3], keys [B] ->
  float32 [B, size, size, 3] in [0, 1]."""
  if crop not in WINDOWS:
    raise ConfigError(f"Unknown crop style {crop!r}; set config.augment.crop to one of "
                      f"{tuple(WINDOWS)}.")
  height, width = images.shape[1], images.shape[2]
  area, aspect = tuple(view_config["crop_area"]), tuple(view_config["crop_aspect"])
  flip_prob = float(view_config["flip_prob"])

  def one(image, key):
    window_key, flip_key = jax.random.split(key)
    window = WINDOWS[crop](window_key, height, width, area, aspect)
    return resize_window(image, window, jax.random.uniform(flip_key) < flip_prob, size, resize)

  return jax.vmap(one)(images, keys)


def crop_views(images, seeds, view_configs: Sequence, size: int, crop: str = "reference",
               resize: str = "bicubic"):
  """Every view of a batch: seeds uint32 [B, V, 2] (one threefry key per example
  and view, from the host) -> V float32 [B, size, size, 3] views in [0, 1]."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"device_crop expects uint8 [B, H, W, 3] images, got {images.shape}.")
  return [random_views(images, jax.random.wrap_key_data(seeds[:, v], impl="threefry2x32"),
                       cfg, size, crop, resize) for v, cfg in enumerate(view_configs)]


def pretrain_views(config, images, seeds):
  """(view1, view2) of a pretraining batch: config.augment.view1 / view2's crops in
  config.augment's crop style and resize method, at config.data.image_size."""
  style = base.resolve_augment(config.augment)
  views = (config.augment.view1, config.augment.view2)
  return tuple(crop_views(images, seeds, views, int(config.data.image_size), style["crop"],
                          style["resize"]))


def center_views(images, size: int, crop_fraction: float, resize: str = "bicubic"):
  """Evaluation views: uint8 [B, H, W, 3] -> float32 [B, size, size, 3] in [0, 1]."""
  window = center_window(images.shape[1], images.shape[2], crop_fraction)
  return jax.vmap(lambda image: resize_window(image, window, False, size, resize))(images)
