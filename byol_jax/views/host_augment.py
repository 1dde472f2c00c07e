"""Host-side image work in TensorFlow, inside tf.data: decoding, crops, resize, flip.

`random_resized_views` and `center_view` change the image size, so they must
run before images can be batched, and decode-and-crop lets a JPEG decoder skip
the pixels no view uses. The colour ops run on the device (`device_augment`).
Every random choice is a stateless TF op seeded by (config.seed, stream
position, view).

Two styles, chosen by `config.augment` (see `configs.base.resolve_augment`):
the released BYOL code's (one-draw crop window, bicubic resize on float,
shipped as float16 in [0, 1]) and the torchvision/SimCLR-style alternative
(Inception crop with 10 tries and a centre fallback, bilinear, uint8).
"""

import math

from byol_jax.errors import ConfigError
from byol_jax.tf_import import import_tensorflow
from byol_jax.views import crop_windows

# Inception-style crops try this many (area, aspect) draws before falling back.
CROP_ATTEMPTS = 10
# The JPEG start-of-image marker; anything else goes to the generic decoder.
_JPEG_MAGIC = b"\xff\xd8\xff"
# What each resize method ships to the device (benchmarks/bench_resize_transfer.py).
# The reference's bicubic view is float; float16 is within 2.4e-4 of it (1/16 of an
# 8-bit level; uint8 and bfloat16: 2e-3), at half float32's bytes and no more host
# CPU than uint8. Bilinear views are rounded to uint8, as torchvision's are.
VIEW_DTYPES = {"bicubic": "float16", "bilinear": "uint8"}


def read_contents(path, contents):
  """In-graph: the encoded image, from `contents` if given else from the file."""
  tf = import_tensorflow()
  return tf.cond(tf.strings.length(contents) > 0, lambda: contents,
                 lambda: tf.io.read_file(path))


def reference_crop_window(seed, height, width, area_range, aspect_range):
  """The released BYOL code's crop window `[y, x, h, w]` (int32): one draw, sides
  clamped to the image, uniform offset (`crop_windows.crop_window_params`)."""
  tf = import_tensorflow()
  u = tf.unstack(tf.random.stateless_uniform([4], seed))
  window = crop_windows.crop_window_params(
      *u, tf.cast(height, tf.float32), tf.cast(width, tf.float32),
      area_range, aspect_range, xp=tf)
  return tf.cast(tf.stack(window), tf.int32)


def inception_crop_window(seed, height, width, area_range, aspect_range,
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


CROP_WINDOWS = {"reference": reference_crop_window, "inception": inception_crop_window}


def sample_crop_window(seed, height, width, area_range, aspect_range, crop: str = "reference"):
  """A random crop window `[y, x, h, w]` (int32) in the `crop` style."""
  if crop not in CROP_WINDOWS:
    raise ConfigError(f"Unknown crop style {crop!r}; set config.augment.crop to one of "
                      f"{tuple(CROP_WINDOWS)}.")
  return CROP_WINDOWS[crop](seed, height, width, area_range, aspect_range)


def center_crop_window(height, width, crop_fraction: float):
  """The reference's centred square window `[y, x, s, s]`: s = floor(crop_fraction x
  short side) in float32, offsets rounded up ((H - s + 1) // 2)."""
  tf = import_tensorflow()
  short = tf.cast(tf.minimum(height, width), tf.float32)
  side = tf.maximum(tf.cast(tf.constant(crop_fraction, tf.float32) * short, tf.int32), 1)
  y = (height - side + 1) // 2
  x = (width - side + 1) // 2
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


def resize_view(crop, size: int, resize: str = "bicubic"):
  """A [h, w, 3] crop (uint8, or float in [0, 255]) -> its size x size view, in
  `VIEW_DTYPES[resize]`: uint8 rounded, or a float dtype in [0, 1].

  "bicubic" is the reference's: bicubic on float without antialiasing, / 255,
  clipped to [0, 1] (bicubic overshoots). A bilinear resize costs a third less.
  """
  tf = import_tensorflow()
  if resize not in VIEW_DTYPES:
    raise ConfigError(f"Unknown resize method {resize!r}; set config.augment.resize to one of "
                      f"{tuple(VIEW_DTYPES)}.")
  view = tf.image.resize(crop, [size, size], method=resize, antialias=False)
  dtype = tf.as_dtype(VIEW_DTYPES[resize])
  if dtype == tf.uint8:
    return tf.saturate_cast(tf.round(view), tf.uint8)
  return tf.cast(tf.clip_by_value(view / 255.0, 0.0, 1.0), dtype)


def _cut_window(image, window, origin, flip, size: int, resize: str):
  """Cuts one [y, x, h, w] window out of `image` (whose top-left pixel sits at
  `origin` of the full image), resizes it and mirrors it if `flip`."""
  tf = import_tensorflow()
  crop = tf.slice(image, tf.concat([window[:2] - origin, [0]], 0),
                  tf.concat([window[2:], [3]], 0))
  view = resize_view(crop, size, resize)
  return tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view)


def _decode_and_cut(contents, windows_fn, flips, size: int, resize: str):
  """Decodes an image once and cuts every view out of it.

  `windows_fn(height, width)` returns the [V, 4] pixel windows. For JPEG only
  the union of the windows is decoded: decode-and-crop skips the IDCT and
  colour conversion outside it and stops after its last row (Huffman decoding
  of the rows above cannot be skipped, so the saving is ~10% for a 70% window
  of a ~100 KB JPEG). Returns [V, size, size, 3] in `VIEW_DTYPES[resize]`.
  """
  tf = import_tensorflow()
  num_views = flips.shape[0]

  def cut(image, origin, windows):
    return tf.stack([_cut_window(image, windows[v], origin, flips[v], size, resize)
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


def random_resized_views(contents, seeds, view_configs, size: int, crop: str = "reference",
                         resize: str = "bicubic"):
  """Host-side views of one encoded image: random resized crop + flip per view.

  Args:
    contents: scalar tf.string, the encoded image (JPEG, PNG, GIF, BMP, WebP).
    seeds: int64 [V, 2] stateless seeds, one per view.
    view_configs: V view config blocks (crop_area, crop_aspect, flip_prob).
    size: output side in pixels.
    crop, resize: `config.augment`'s resolved crop style and resize method.

  Returns:
    [V, size, size, 3] in `VIEW_DTYPES[resize]`.
  """
  tf = import_tensorflow()
  flips, crop_seeds = [], []
  for v, cfg in enumerate(view_configs):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[v], 2))
    crop_seeds.append(crop_seed)
    flips.append(tf.random.stateless_uniform([], flip_seed) < cfg["flip_prob"])

  def windows(height, width):
    return tf.stack([
        sample_crop_window(crop_seeds[v], height, width, cfg["crop_area"], cfg["crop_aspect"],
                           crop)
        for v, cfg in enumerate(view_configs)])

  return _decode_and_cut(contents, windows, tf.stack(flips), size, resize)


def center_view(contents, size: int, crop_fraction: float, resize: str = "bicubic"):
  """Evaluation preprocessing: the centred square window of `center_crop_window`,
  resized to `size`. Returns [size, size, 3] in `VIEW_DTYPES[resize]`."""
  tf = import_tensorflow()

  def windows(height, width):
    return center_crop_window(height, width, crop_fraction)[None]

  return _decode_and_cut(contents, windows, tf.zeros([1], tf.bool), size, resize)[0]
