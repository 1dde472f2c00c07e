"""byol_jax against DeepMind's released BYOL code (deepmind-research/byol).

The oracles are tf.image itself for the colour ops (the reference's colour ops
follow it) and plain NumPy written from the reference's definitions (tf.image's
kernels in float64, byol/utils/dataset.py's crops), independent of the code
under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import tf_import
from byol_jax.configs import base
from byol_jax.model import networks
from byol_jax.views import crop_windows, device_augment, host_augment

LUMA = np.array([0.2989, 0.5870, 0.1140])


# ---------------------------------------------------------------------------
# NumPy oracles of tf.image's colour kernels (float64, one pixel at a time
# where TF's kernel branches).
# ---------------------------------------------------------------------------

def np_rgb_to_hsv(rgb):
  """tensorflow/core/kernels/image/colorspace_op.h, rgb_to_hsv."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = rgb.max(-1)
  rng = v - rgb.min(-1)
  s = np.where(v > 0, rng / np.where(v > 0, v, 1), 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    norm = 1.0 / (6.0 * rng)
    h = np.where(r == v, norm * (g - b),
                 np.where(g == v, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6))
  h = np.where(rng <= 0, 0.0, h)
  return np.where(h < 0, h + 1, h), s, v


def np_hsv_to_rgb(h, s, v):
  """The same file's hsv_to_rgb: six hue sectors of the hexcone."""
  c = s * v
  m = v - c
  dh = h * 6
  category = dh.astype(int)
  x = c * (1 - np.abs(np.mod(dh, 2.0) - 1))
  zero = np.zeros_like(c)
  table = {0: (c, x, zero), 1: (x, c, zero), 2: (zero, c, x),
           3: (zero, x, c), 4: (x, zero, c), 5: (c, zero, x)}
  out = np.zeros(h.shape + (3,))
  for k, channels in table.items():
    out[category == k] = np.stack(channels, -1)[category == k]
  return out + m[..., None]


def np_brightness(x, delta):
  return x + delta


def np_contrast(x, factor):
  mean = x.mean(axis=(0, 1), keepdims=True)
  return (x - mean) * factor + mean


def np_saturation(x, factor):
  h, s, v = np_rgb_to_hsv(x)
  return np_hsv_to_rgb(h, np.clip(s * factor, 0, 1), v)


def np_hue(x, delta):
  h, s, v = np_rgb_to_hsv(x)
  h = np.mod(h + delta, 1.0)
  return np_hsv_to_rgb(h, s, v)


def np_grayscale(x):
  return np.repeat((x @ LUMA)[..., None], 3, -1)


def np_blur(x, sigma, radius):
  """Separable Gaussian with zero padding ('SAME' convolution), as the reference."""
  t = np.arange(-radius, radius + 1)
  k = np.exp(-t ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  x = np.apply_along_axis(lambda row: np.convolve(row, k, mode="same"), 1, x)
  return np.apply_along_axis(lambda col: np.convolve(col, k, mode="same"), 0, x)


def np_solarize(x, threshold):
  return np.where(x < threshold, x, 1 - x)


NP_OPS = (np_brightness, np_contrast, np_saturation, np_hue)


def edge_case_image(height=12, width=10, seed=0):
  """Random pixels plus saturated, gray, black, white, 0/1 mixes and near-ties."""
  image = np.random.default_rng(seed).random((height, width, 3))
  special = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1),
             (0.5, 0.5, 0.5), (0, 0, 0), (1, 1, 1), (1, 0, 0.5), (0, 0.2, 1),
             (0.7, 0.7, 0.2), (0.2, 0.7, 0.7), (0.9, 0.1, 0.9), (0.3, 0.3, 0.31),
             (1, 1, 0.999), (0.05, 0, 0), (0.25, 0.25, 0.25)]
  image.reshape(-1, 3)[:len(special)] = special
  image[-1] = 1.0  # a white bottom row: the zero-padded blur darkens it
  return image.astype(np.float32)


# ---------------------------------------------------------------------------
# Colour ops.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("delta", [-0.4, -0.1, 0.25, 0.4])
def test_brightness_adds_delta(delta):
  x = edge_case_image()
  got = device_augment.adjust_brightness(jnp.asarray(x), delta)
  np.testing.assert_allclose(got, np_brightness(x.astype(np.float64), delta), atol=1e-5)


@pytest.mark.parametrize("factor", [0.6, 0.9, 1.4])
def test_contrast_is_per_channel_around_each_mean(factor):
  x = edge_case_image(seed=1)
  got = device_augment.adjust_contrast(jnp.asarray(x), factor)
  np.testing.assert_allclose(got, np_contrast(x.astype(np.float64), factor), atol=1e-5)
  # A gray-level mean (torchvision) would differ: channel means differ here.
  assert np.ptp(x.mean(axis=(0, 1))) > 0.01


@pytest.mark.parametrize("factor", [0.0, 0.8, 1.0, 1.2, 3.0])
def test_saturation_is_hsv_with_clip(factor):
  x = edge_case_image(seed=2)
  got = np.asarray(device_augment.adjust_saturation(jnp.asarray(x), factor))
  np.testing.assert_allclose(got, np_saturation(x.astype(np.float64), factor), atol=1e-5)


@pytest.mark.parametrize("delta", [-0.5, -0.1, 0.0, 0.07, 0.1, 0.5])
def test_hue_matches_tf_kernel(delta):
  x = edge_case_image(seed=3)
  got = np.asarray(device_augment.adjust_hue(jnp.asarray(x), delta))
  np.testing.assert_allclose(got, np_hue(x.astype(np.float64), delta), atol=1e-5)


# tf.image itself, the library the reference's colour ops follow, as the oracle. Same
# float32 inputs on both sides; TF's kernels compute in float32 too, with their own
# operation order: measured at most 5.4e-7 apart (2026-12-07, AMD EPYC VM; pixels in
# [0, 1], under 5 ulp at 1), 1e-5 leaves 18x. A wrong formula (torchvision's blend
# saturation, below) is off by > 1e-2 on these edge-case pixels.
TF_ATOL = 1e-5
TF_IMAGE_CASES = [("adjust_brightness", -0.3), ("adjust_brightness", 0.25),
                  ("adjust_contrast", 0.6), ("adjust_contrast", 1.4),
                  ("adjust_saturation", 0.0), ("adjust_saturation", 0.8),
                  ("adjust_saturation", 1.2), ("adjust_saturation", 3.0),
                  ("adjust_hue", -0.5), ("adjust_hue", -0.1), ("adjust_hue", 0.07),
                  ("adjust_hue", 0.5)]


@pytest.mark.parametrize("op, value", TF_IMAGE_CASES)
def test_colour_ops_match_tf_image(tf, op, value):
  x = edge_case_image(seed=7)
  got = np.asarray(getattr(device_augment, op)(jnp.asarray(x), value))
  want = getattr(tf.image, op)(tf.constant(x), value).numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=TF_ATOL)
  if op == "adjust_saturation" and value != 1.0:  # the oracle tells the semantics apart
    other = np.clip(device_augment.torchvision_saturation(jnp.asarray(x), value), 0, 1)
    assert np.abs(np.asarray(other) - np.clip(want, 0, 1)).max() > 1e-2


def test_grayscale_matches_tf_image(tf):
  x = edge_case_image(seed=8)
  want = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(tf.constant(x))).numpy()
  np.testing.assert_allclose(device_augment.to_grayscale(jnp.asarray(x)), want, rtol=0,
                             atol=TF_ATOL)


def test_grayscale_and_solarize():
  x = edge_case_image(seed=4)
  np.testing.assert_allclose(device_augment.to_grayscale(jnp.asarray(x)),
                             np_grayscale(x.astype(np.float64)), atol=1e-5)
  np.testing.assert_allclose(device_augment.solarize(jnp.asarray(x), 0.5),
                             np_solarize(x, 0.5), atol=1e-7)


@pytest.mark.parametrize("sigma, radius", [(0.1, 1), (1.0, 2), (2.0, 4)])
def test_blur_pads_with_zeros(sigma, radius):
  x = edge_case_image(16, 13, seed=5)
  got = np.asarray(device_augment.gaussian_blur(jnp.asarray(x), sigma, radius))
  want = np_blur(x.astype(np.float64), sigma, radius)
  np.testing.assert_allclose(got, want, atol=1e-5)
  if sigma >= 1:  # the white bottom row loses weight to the zero padding
    assert want[-1, 5:8].max() < 0.95


def test_blur_radius_is_the_references():
  for side in (16, 19, 20, 32, 39, 40, 96, 128, 224):
    assert device_augment.blur_kernel_radius(side) == int(side / 10.0 / 2), side


def _np_jitter(x, params):
  for op in np.asarray(params["order"]):
    value = float(params[("brightness", "contrast", "saturation", "hue")[op]])
    x = np.clip(NP_OPS[op](x, value), 0, 1)
  return x


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_color_jitter_sequence(order):
  x = edge_case_image(seed=6)
  params = dict(brightness=np.float32(0.3), contrast=np.float32(1.35),
                saturation=np.float32(1.2), hue=np.float32(-0.08), order=np.asarray(order))
  got = device_augment.color_jitter(jnp.asarray(x), jax.tree.map(jnp.asarray, params))
  np.testing.assert_allclose(got, _np_jitter(x.astype(np.float64), params), atol=1e-5)


def test_whole_view_matches_reference_pipeline():
  """Jitter (drawn order) -> grayscale -> zero-padded blur -> solarize -> clip, every
  op on, with each example's own sampled parameters, batched and jitted."""
  cfg = base.view_config(blur_prob=1.0, solarize_prob=1.0)
  cfg.color_jitter_prob, cfg.grayscale_prob = 1.0, 0.0
  n, size = 12, 40  # radius 2
  images = np.stack([edge_case_image(size, size, seed=s) for s in range(n)])
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  params = jax.vmap(lambda k: device_augment.sample_view_params(k, cfg))(keys)
  got = np.asarray(jax.jit(jax.vmap(lambda i, p: device_augment.apply_view_params(i, p, cfg)))(
      jnp.asarray(images), params))
  params = jax.tree.map(np.asarray, params)
  for row in range(n):
    p = {k: v[row] for k, v in params.items()}
    pre = np_blur(_np_jitter(images[row].astype(np.float64), p), float(p["sigma"]),
                  device_augment.blur_kernel_radius(size))
    want = np.clip(np_solarize(pre, 0.5), 0, 1)
    away = np.abs(pre - 0.5) > 1e-4  # rounding may flip pixels at the threshold
    assert away.mean() > 0.99
    np.testing.assert_allclose(got[row][away], want[away], atol=1e-5)


def test_reference_parameter_ranges():
  cfg = base.get_base_config().augment.view1
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  params = jax.vmap(lambda k: device_augment.sample_view_params(k, cfg))(keys)
  for name, (lo, hi) in dict(brightness=(-0.4, 0.4), contrast=(0.6, 1.4),
                             saturation=(0.8, 1.2), hue=(-0.1, 0.1)).items():
    v = np.asarray(params[name])
    # Inside the range, and reaching both ends of it (4000 uniform draws).
    assert lo - 1e-6 <= v.min() < lo + 0.01 * (hi - lo), name
    assert hi - 0.01 * (hi - lo) < v.max() <= hi + 1e-6, name


# ---------------------------------------------------------------------------
# Crop windows.
# ---------------------------------------------------------------------------

def np_reference_windows(u, height, width):
  """byol/utils/dataset.py `_decode_and_random_crop`, in float32 like TF."""
  f32 = np.float32
  area = f32(height * width) * (f32(0.08) + (f32(1.0) - f32(0.08)) * u[0])
  lo, hi = f32(math.log(3 / 4)), f32(math.log(4 / 3))
  ratio = np.exp(lo + (hi - lo) * u[1])
  w = np.minimum(np.round(np.sqrt(area * ratio)).astype(np.int64), width)
  h = np.minimum(np.round(np.sqrt(area / ratio)).astype(np.int64), height)
  y = np.floor(u[2] * (height - h + 1)).astype(np.int64)
  x = np.floor(u[3] * (width - w + 1)).astype(np.int64)
  return np.stack([y, x, h, w], -1)


def window_stats(windows, height, width):
  h, w = windows[:, 2], windows[:, 3]
  area = h * w / (height * width)
  return dict(mean_area=(area.mean(), area.std()), p_big=((area > 0.8).mean(), None),
              log_ratio=(np.log(w / h).mean(), np.log(w / h).std()),
              p_clamped=(((w == width) | (h == height)).mean(), None))


@pytest.fixture(scope="module")
def tf():
  return tf_import.import_tensorflow()


def _tf_windows(tf, fn, n, height, width):
  seeds = tf.stack([tf.fill([n], tf.constant(5, tf.int64)), tf.range(n, dtype=tf.int64)], 1)
  run = tf.function(lambda s: tf.map_fn(
      lambda seed: fn(seed, height, width, (0.08, 1.0), (3 / 4, 4 / 3)), s,
      fn_output_signature=tf.int32))
  return run(seeds).numpy(), seeds


SIZES = [(375, 500), (32, 32)]


def test_crop_windows_module_is_the_reference_algorithm():
  u = np.random.default_rng(0).random((4, 100_000)).astype(np.float32)
  for height, width in SIZES:
    y, x, h, w = crop_windows.crop_window_params(*u, np.float32(height), np.float32(width))
    got = np.stack([y, x, h, w], -1).astype(np.int64)
    want = np_reference_windows(u, height, width)
    assert (got == want).all(axis=1).mean() > 0.9999
    assert np.abs(got - want).max() <= 1
    jy, jx, jh, jw = crop_windows.crop_window_params(
        *jnp.asarray(u[:, :1000]), jnp.float32(height), jnp.float32(width), xp=jnp)
    np.testing.assert_array_equal(np.stack([jy, jx, jh, jw], -1), got[:1000])


@pytest.mark.parametrize("height, width", SIZES)
def test_host_crop_distribution_matches_reference(tf, height, width):
  n = 5000
  got, _ = _tf_windows(tf, host_augment.reference_crop_window, n, height, width)
  y, x, h, w = got.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  truth = window_stats(np_reference_windows(
      np.random.default_rng(1).random((4, 1_000_000)).astype(np.float32), height, width),
      height, width)
  for name, (value, sd) in window_stats(got, height, width).items():
    expected, true_sd = truth[name]
    se = (true_sd if true_sd is not None else math.sqrt(expected * (1 - expected))) / math.sqrt(n)
    assert abs(value - expected) < 5 * se + 1e-9, (name, value, expected)
  # Aspect bounds: windows clamped by neither side keep w / h in [3/4, 4/3] up to rounding.
  free = (w < width) & (h < height)
  ratio = w[free] / h[free]
  assert (ratio >= 3 / 4 * (1 - 1 / h[free]) - 1e-9).all()
  assert (ratio <= 4 / 3 * (1 + 1 / h[free]) + 1e-9).all()
  if height == 375:
    assert abs(truth["mean_area"][0] - 0.518) < 0.002 and abs(truth["p_big"][0] - 0.126) < 0.002


def test_inception_crop_is_distinguishable(tf):
  """The statistics above have the power to tell the two crop styles apart."""
  n, height, width = 5000, 375, 500
  got, _ = _tf_windows(tf, host_augment.inception_crop_window, n, height, width)
  area = got[:, 2] * got[:, 3] / (height * width)
  truth = np_reference_windows(np.random.default_rng(2).random((4, 1_000_000)).astype(np.float32),
                               height, width)
  ref_area = truth[:, 2] * truth[:, 3] / (height * width)
  assert abs(area.mean() - ref_area.mean()) > 5 * ref_area.std() / math.sqrt(n)


def test_host_crop_is_crop_windows_on_its_uniforms(tf):
  n, height, width = 2000, 375, 500
  got, seeds = _tf_windows(tf, host_augment.reference_crop_window, n, height, width)
  u = tf.map_fn(lambda s: tf.random.stateless_uniform([4], s), seeds,
                fn_output_signature=tf.float32).numpy().T
  want = np.stack(crop_windows.crop_window_params(*u, np.float32(height), np.float32(width)), -1)
  assert (got == want).all(axis=1).mean() > 0.999
  assert np.abs(got - want).max() <= 1


# ---------------------------------------------------------------------------
# Resize, centre crop and heads.
# ---------------------------------------------------------------------------

def test_bicubic_view_is_the_references_float_path(tf):
  crop = np.random.default_rng(7).integers(0, 256, (50, 70, 3), np.uint8)
  crop[10:20] = 255  # a hard edge: bicubic overshoots above 255 and below 0
  got = host_augment.resize_view(tf.constant(crop), 32, "bicubic").numpy()
  assert got.dtype == np.dtype(host_augment.VIEW_DTYPES["bicubic"])
  raw = tf.image.resize(tf.constant(crop), [32, 32], method="bicubic").numpy()
  assert raw.max() > 255 or raw.min() < 0
  want = np.clip(raw / 255.0, 0.0, 1.0)
  assert np.abs(got.astype(np.float32) - want).max() <= 2 ** -12  # float16 rounding


@pytest.mark.parametrize("height, width, fraction", [(375, 500, 224 / 256), (500, 333, 224 / 256),
                                                     (160, 213, 128 / 160), (33, 32, 1.0)])
def test_center_window_is_the_references(tf, height, width, fraction):
  side = int(np.float32(fraction) * np.float32(min(height, width)))
  want = [(height - side + 1) // 2, (width - side + 1) // 2, side, side]
  got = host_augment.center_crop_window(tf.constant(height), tf.constant(width), fraction)
  np.testing.assert_array_equal(got.numpy(), want)


def test_heads_have_no_output_bias():
  c = base.get_base_config()
  c.model.update(depth=18, base_channels=8, projector_hidden=16, predictor_hidden=16,
                 projection_dim=8)
  nets = networks.make_networks(c.model, num_classes=3)
  params, _ = jax.eval_shape(lambda: nets.online.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((2, 32, 32, 3)), True))
  for head in ("projector", "predictor"):
    assert set(params[f"{head}/linear2"]) == {"w"}, head
    assert set(params[f"{head}/linear1"]) == {"w", "b"}, head
  assert not c.model.zero_init_residual
