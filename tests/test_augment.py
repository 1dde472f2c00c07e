"""Augmentation ops: the device-side JAX ops and the host-side TF crops/flips."""

import colorsys
import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from byol_jax import tf_import
from byol_jax.configs import base
from byol_jax.views import device_augment, host_augment

N_DRAWS = 4000
# The same per-example ops compiled for another batch shape (sharded, vmapped, one example):
# XLA:CPU may vectorise and fuse (FMA) them otherwise, so ~10 chained ops on pixels in [0, 1]
# round differently: 6.9e-7 (6 ulp at 1) measured 2026-12-07 on the AMD EPYC VM, where 1e-6
# sat at the edge. A wrong example, key or op is off by > 1e-2.
SHAPE_ATOL = 1e-5


def view(**overrides):
  """A view config with every device op off unless overridden."""
  cfg = base.view_config(blur_prob=0.0, solarize_prob=0.0)
  cfg.color_jitter_prob = 0.0
  cfg.grayscale_prob = 0.0
  cfg.update(overrides)
  return cfg


def binomial_ok(count, n, p, sigmas=5.0):
  """True when count/n is within `sigmas` binomial standard deviations of p."""
  sd = math.sqrt(max(p * (1 - p), 1e-12) / n)
  return abs(count / n - p) <= sigmas * sd + 1e-9


def run(images, cfg, seed=0, color="tf_image"):
  fn = jax.jit(functools.partial(device_augment.device_augment, view_config=cfg, color=color))
  return np.asarray(fn(jnp.asarray(images), jax.random.PRNGKey(seed)))


def constant_images(n, rgb, size=8):
  return np.broadcast_to(np.asarray(rgb, np.uint8), (n, size, size, 3)).copy()


# ---------------------------------------------------------------------------
# Device side.
# ---------------------------------------------------------------------------

def test_output_shape_dtype_range_for_default_views():
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), np.uint8)
  c = base.get_base_config()
  for cfg in (c.augment.view1, c.augment.view2):
    out = run(images, cfg)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.isfinite(out).all()


def test_all_probabilities_zero_is_identity():
  images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), np.uint8)
  out = run(images, view())
  np.testing.assert_allclose(out, images / 255.0, atol=1e-6)


def test_solarize_fraction_matches_probability():
  # A constant 0.8 image solarizes to 0.2: each view is one or the other.
  out = run(constant_images(N_DRAWS, (204, 204, 204)), view(solarize_prob=0.2))
  means = out.mean(axis=(1, 2, 3))
  solarized = np.isclose(means, 1 - 204 / 255, atol=1e-5)
  assert (solarized | np.isclose(means, 204 / 255, atol=1e-5)).all()
  assert binomial_ok(solarized.sum(), N_DRAWS, 0.2)


def test_solarize_threshold():
  images = np.stack([constant_images(1, (v, v, v))[0] for v in (50, 127, 128, 250)])
  out = run(images, view(solarize_prob=1.0, solarize_threshold=0.5))[:, 0, 0, 0]
  np.testing.assert_allclose(out, [50 / 255, 127 / 255, 1 - 128 / 255, 1 - 250 / 255], atol=1e-6)


def test_grayscale_fraction_matches_probability():
  out = run(constant_images(N_DRAWS, (200, 40, 90)), view(grayscale_prob=0.3))
  gray = np.all(np.isclose(out[..., 0], out[..., 1]) & np.isclose(out[..., 1], out[..., 2]),
                axis=(1, 2))
  assert binomial_ok(gray.sum(), N_DRAWS, 0.3)
  expected = (0.2989 * 200 + 0.587 * 40 + 0.114 * 90) / 255
  np.testing.assert_allclose(out[gray][:, 0, 0, 0], expected, atol=1e-4)


def test_blur_fraction_matches_probability():
  # A checkerboard loses most of its contrast under blur with sigma >= 1 (32 px:
  # radius 1; below 20 px the reference's kernel has one tap and does nothing).
  board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
  images = np.broadcast_to(board[None, :, :, None], (N_DRAWS, 32, 32, 3)).copy()
  out = run(images, view(blur_prob=0.4, blur_sigma=(1.0, 2.0)))
  blurred = out.std(axis=(1, 2, 3)) < 0.3
  unchanged = np.all(np.isclose(out, images / 255.0, atol=1e-6), axis=(1, 2, 3))
  assert (blurred ^ unchanged).all()  # every view is exactly one of the two
  assert binomial_ok(blurred.sum(), N_DRAWS, 0.4)


def test_jitter_fraction_matches_probability():
  images = np.random.default_rng(2).integers(60, 200, (N_DRAWS, 8, 8, 3), np.uint8)
  out = run(images, view(color_jitter_prob=0.8))
  changed = np.abs(out - images / 255.0).max(axis=(1, 2, 3)) > 1e-3
  assert binomial_ok(changed.sum(), N_DRAWS, 0.8)


def test_probability_one_always_applies():
  images = np.random.default_rng(3).integers(0, 256, (64, 12, 12, 3), np.uint8)
  out = run(images, view(color_jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0,
                         solarize_prob=1.0))
  # Grayscale then blur then solarize keep the three channels equal.
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)


def test_sampled_decisions_match_default_view_probabilities():
  c = base.get_base_config()
  keys = jax.random.split(jax.random.PRNGKey(7), N_DRAWS)
  for cfg in (c.augment.view1, c.augment.view2):
    params = jax.vmap(lambda k, cfg=cfg: device_augment.sample_view_params(k, cfg))(keys)
    for flag, prob in (("jitter", cfg.color_jitter_prob), ("grayscale", cfg.grayscale_prob),
                       ("blur", cfg.blur_prob), ("solarize", cfg.solarize_prob)):
      assert binomial_ok(int(np.sum(params[flag])), N_DRAWS, prob), (flag, prob)
    lo, hi = cfg.blur_sigma
    assert lo <= float(params["sigma"].min()) and float(params["sigma"].max()) <= hi
    assert float(np.abs(params["hue"]).max()) <= cfg.hue
    delta = np.asarray(params["brightness"])  # tf_image: an additive delta
    assert np.abs(delta).max() <= cfg.brightness + 1e-6 and delta.min() < 0 < delta.max()
    orders = np.asarray(params["order"])
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    # All 24 orders occur, each about 1/24 of the time.
    _, counts = np.unique(orders, axis=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > N_DRAWS / 24 / 2


def test_adjust_hue_matches_colorsys():
  rgb = np.random.default_rng(4).random((500, 3)).astype(np.float32)
  rgb[:5] = [[0.3, 0.3, 0.3], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0.2, 0.9, 0.9]]
  for delta in (0.0, 0.1, -0.37, 0.5):
    got = np.asarray(device_augment.adjust_hue(jnp.asarray(rgb), delta))
    want = []
    for r, g, b in rgb:
      h, s, v = colorsys.rgb_to_hsv(r, g, b)
      want.append(colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)


JITTER_OPS = {
    "tf_image": (device_augment.adjust_brightness, device_augment.adjust_contrast,
                 device_augment.adjust_saturation, device_augment.adjust_hue),
    "torchvision": (device_augment.torchvision_brightness, device_augment.torchvision_contrast,
                    device_augment.torchvision_saturation, device_augment.adjust_hue),
}


@pytest.mark.parametrize("color", sorted(JITTER_OPS))
def test_color_jitter_applies_ops_in_the_sampled_order(color):
  rng = np.random.default_rng(5)
  image = jnp.asarray(rng.random((6, 6, 3)), jnp.float32)
  params = dict(brightness=jnp.float32(0.3 if color == "tf_image" else 1.3),
                contrast=jnp.float32(0.7), saturation=jnp.float32(1.2), hue=jnp.float32(0.08))
  values = [params[k] for k in ("brightness", "contrast", "saturation", "hue")]
  outputs = []
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
    want = image
    for op in order:
      want = jnp.clip(JITTER_OPS[color][op](want, values[op]), 0.0, 1.0)
    got = device_augment.color_jitter(image, dict(params, order=jnp.asarray(order)), color)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    outputs.append(np.asarray(got))
  assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the order matters


def test_torchvision_ops_are_blends():
  image = jnp.asarray(np.random.default_rng(13).random((5, 7, 3)), jnp.float32)
  gray = np.asarray(image) @ np.array([0.2989, 0.587, 0.114])
  np.testing.assert_allclose(device_augment.torchvision_brightness(image, 0.0), 0.0)
  np.testing.assert_allclose(device_augment.torchvision_saturation(image, 0.0),
                             np.repeat(gray[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(device_augment.torchvision_contrast(image, 0.0), gray.mean(),
                             atol=1e-6)


def test_gaussian_blur_kernel_and_borders():
  radius = device_augment.blur_kernel_radius
  assert (radius(224), radius(96), radius(32), radius(16)) == (11, 4, 1, 0)
  const = jnp.full((20, 20, 3), 0.4)
  # Reflected borders (torchvision) keep a constant image; zero padding (the
  # reference) darkens only the `radius` pixels next to each border.
  np.testing.assert_allclose(device_augment.gaussian_blur(const, 1.5, 2, "reflect"), 0.4,
                             atol=1e-6)
  zero = np.asarray(device_augment.gaussian_blur(const, 1.5, 2))
  np.testing.assert_allclose(zero[2:-2, 2:-2], 0.4, atol=1e-6)
  assert zero[0, 0, 0] < zero[1, 1, 0] < 0.4
  impulse = jnp.zeros((21, 21, 1)).at[10, 10, 0].set(1.0)
  out = np.asarray(device_augment.gaussian_blur(impulse, 1.0, 3))[..., 0]
  assert abs(out.sum() - 1.0) < 1e-5 and out[10, 10] == out.max()
  np.testing.assert_allclose(out, out.T, atol=1e-7)


def test_make_augment_fn_follows_the_color_style():
  c = base.get_base_config()
  images = np.random.default_rng(14).integers(0, 256, (8, 24, 24, 3), np.uint8)
  key = jax.random.PRNGKey(4)
  ref = device_augment.make_augment_fn(c)(images, key, 0)
  c.augment.style = "torchvision"
  tv = device_augment.make_augment_fn(c)(images, key, 0)
  np.testing.assert_allclose(tv, device_augment.device_augment(images, key, c.augment.view1,
                                                               "torchvision"), atol=1e-6)
  assert np.abs(np.asarray(tv) - np.asarray(ref)).max() > 1e-2
  c.augment.color = "tf_image"  # an explicit field wins over the style
  np.testing.assert_allclose(device_augment.make_augment_fn(c)(images, key, 0), ref, atol=1e-6)


def test_examples_are_independent_of_their_batch_neighbours():
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (8, 16, 16, 3), np.uint8)
  other = images.copy()
  other[1:] = rng.integers(0, 256, (7, 16, 16, 3), np.uint8)
  cfg = base.get_base_config().augment.view2
  np.testing.assert_array_equal(run(images, cfg)[0], run(other, cfg)[0])


def test_jitted_batch_matches_eager_per_example():
  # Batched, fused code must agree with one example at a time. An earlier hue op
  # that found its sector by `max == channel` failed this on XLA:CPU: fusion
  # recomputed the channels with different rounding, so no sector matched.
  cfg = base.get_base_config().augment.view1
  images = np.random.default_rng(12).integers(0, 256, (16, 16, 16, 3), np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(3), 16)
  params = jax.vmap(lambda k: device_augment.sample_view_params(k, cfg))(keys)
  x = jnp.asarray(images, jnp.float32) / 255.0
  batched = np.asarray(jax.jit(jax.vmap(
      lambda i, p: device_augment.apply_view_params(i, p, cfg)))(x, params))
  one = jax.jit(lambda i, p: device_augment.apply_view_params(i, p, cfg))
  for row in range(16):
    single = one(x[row], {k: v[row] for k, v in params.items()})
    np.testing.assert_allclose(batched[row], np.asarray(single), atol=1e-5)


def test_result_does_not_depend_on_sharding():
  devices = jax.devices()
  assert len(devices) == 8, "conftest.py asks XLA for 8 CPU devices"
  images = np.random.default_rng(7).integers(0, 256, (16, 16, 16, 3), np.uint8)
  cfg = base.get_base_config().augment.view1
  fn = jax.jit(functools.partial(device_augment.device_augment, view_config=cfg))
  key = jax.random.PRNGKey(3)
  single = np.asarray(fn(jnp.asarray(images), key))
  mesh = Mesh(np.asarray(devices), ("data",))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  np.testing.assert_allclose(np.asarray(fn(sharded, key)), single, atol=SHAPE_ATOL)


def test_vmappable_over_batches_and_make_augment_fn():
  c = base.get_base_config()
  images = np.random.default_rng(8).integers(0, 256, (2, 3, 8, 8, 3), np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  out = jax.vmap(lambda x, k: device_augment.device_augment(x, k, c.augment.view2))(images, keys)
  assert out.shape == images.shape
  np.testing.assert_allclose(out[1], device_augment.device_augment(images[1], keys[1],
                                                                   c.augment.view2),
                             atol=SHAPE_ATOL)
  fn = device_augment.make_augment_fn(c)
  np.testing.assert_allclose(fn(images[0], keys[0], 1),
                             device_augment.device_augment(images[0], keys[0], c.augment.view2))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    device_augment.device_augment(images[0, 0], keys[0], c.augment.view1)


# ---------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tf():
  return tf_import.import_tensorflow()


def _windows(tf, height, width, area, aspect, n=2000, crop="reference"):
  fn = tf.function(lambda seeds: tf.map_fn(
      lambda seed: host_augment.sample_crop_window(seed, height, width, area, aspect, crop), seeds,
      fn_output_signature=tf.int32))
  return fn(tf.stack([tf.fill([n], tf.constant(11, tf.int64)), tf.range(n, dtype=tf.int64)], 1)
            ).numpy()


@pytest.mark.parametrize("crop", ["reference", "inception"])
def test_crop_windows_stay_within_bounds(tf, crop):
  height, width = 90, 160
  w = _windows(tf, height, width, (0.08, 1.0), (3 / 4, 4 / 3), crop=crop)
  y, x, h, cw = w.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + cw <= width).all()
  area = h * cw / (height * width)
  # Sides are rounded to whole pixels: allow one pixel of slack on each.
  slack = (h + 1) * (cw + 1) / (height * width) - area
  ratio = cw / h
  # The reference clamps a side that does not fit, so only unclamped windows keep
  # the drawn area and aspect; the Inception crop redraws instead.
  kept = (h < height) & (cw < width) if crop == "reference" else np.ones_like(h, bool)
  assert (area[kept] >= 0.08 - slack[kept]).all() and (area <= 1.0 + 1e-9).all()
  assert (ratio[kept] >= 3 / 4 * (1 - 1 / h[kept]) - 1e-9).all()
  assert (ratio[kept] <= 4 / 3 * (1 + 1 / h[kept])).all()
  assert kept.mean() > 0.5
  if crop == "inception":  # log-uniform aspect: log ratios centred on 0 (symmetric range)
    assert abs(np.median(np.log(ratio))) < 0.05
  # Offsets spread over the image (not always centred).
  assert len(np.unique(y)) > 20 and len(np.unique(x)) > 20


def test_inception_crop_falls_back_to_centre_crop(tf):
  # A 2:1 to 3:1 aspect with the whole area cannot fit in a square image.
  w = _windows(tf, 40, 40, (1.0, 1.0), (2.0, 3.0), n=5, crop="inception")
  np.testing.assert_array_equal(w, np.tile([[10, 0, 20, 40]], (5, 1)))
  # The reference clamps instead: full width, height sqrt(1600 / ratio) rounded.
  w = _windows(tf, 40, 40, (1.0, 1.0), (2.0, 3.0), n=200)
  assert (w[:, 3] == 40).all() and (w[:, 2] >= 23).all() and (w[:, 2] <= 28).all()


@pytest.mark.parametrize("crop", ["reference", "inception"])
def test_tiny_images_give_valid_windows(tf, crop):
  w = _windows(tf, 5, 5, (0.08, 1.0), (3 / 4, 4 / 3), n=200, crop=crop)
  assert (w[:, 2] >= 1).all() and (w[:, 3] >= 1).all()
  assert (w[:, 0] + w[:, 2] <= 5).all() and (w[:, 1] + w[:, 3] <= 5).all()
  with pytest.raises(ValueError, match="config.augment.crop"):
    host_augment.sample_crop_window(tf.constant([1, 2], tf.int64), 5, 5, (0.1, 1), (1, 1), "x")


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def as_unit(views):
  """Host views (uint8, or float in [0, 1]) -> float32 in [0, 1]."""
  return views / 255.0 if views.dtype == np.uint8 else views.astype(np.float32)


@pytest.mark.parametrize("resize", sorted(host_augment.VIEW_DTYPES))
def test_flip_fraction_and_full_crop_is_exact(tf, resize):
  image = np.random.default_rng(9).integers(0, 256, (16, 16, 3), np.uint8)
  contents = tf.constant(_png(image))
  exact = image / 255.0
  tol = 2 ** -12  # float16 rounding of the bicubic view; uint8 is exact

  def views(flip_prob, n):
    cfg = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_prob=flip_prob)
    fn = tf.function(lambda s: host_augment.random_resized_views(contents, s, (cfg, cfg), 16,
                                                                 resize=resize))
    out = np.stack([fn(tf.constant([[1, i], [2, i]], tf.int64)).numpy() for i in range(n)])
    assert out.dtype == np.dtype(host_augment.VIEW_DTYPES[resize])
    return as_unit(out)

  def close(out, want):
    return np.all(np.abs(out - want) <= tol, axis=(-3, -2, -1))

  out = views(0.5, 1000)
  same, mirrored = close(out, exact), close(out, exact[:, ::-1])
  assert (same ^ mirrored).all()  # a full crop at the same size is exact
  assert binomial_ok(mirrored.sum(), mirrored.size, 0.5)
  assert not np.array_equal(mirrored[:, 0], mirrored[:, 1])  # the two views flip independently
  assert close(views(0.0, 20), exact).all()
  assert close(views(1.0, 20), exact[:, ::-1]).all()


def test_random_crops_are_deterministic_in_the_seed(tf):
  image = np.random.default_rng(10).integers(0, 256, (40, 60, 3), np.uint8)
  contents = tf.constant(_png(image))
  cfg = base.get_base_config().augment.view1
  fn = lambda s: host_augment.random_resized_views(contents, tf.constant(s, tf.int64), (cfg,), 24)
  a, b, c = fn([[0, 5]]), fn([[0, 5]]), fn([[0, 6]])
  assert a.shape == (1, 24, 24, 3) and a.dtype == host_augment.VIEW_DTYPES["bicubic"]
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize("resize", sorted(host_augment.VIEW_DTYPES))
def test_center_view(tf, resize):
  image = np.zeros((64, 96, 3), np.uint8)
  image[16:48, 32:64] = 255  # the centre half of the short side
  out = host_augment.center_view(tf.constant(_png(image)), 32, 0.5, resize).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.dtype(host_augment.VIEW_DTYPES[resize])
  assert as_unit(out).min() == 1.0
  same = host_augment.center_view(tf.constant(_png(image[:32, :32])), 32, 1.0, resize).numpy()
  np.testing.assert_allclose(as_unit(same), image[:32, :32] / 255.0, atol=2 ** -12)


def test_jpeg_decode_and_crop_matches_full_decode(tf):
  rng = np.random.default_rng(11)
  image = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=95)
  jpeg = buffer.getvalue()
  cfg = dict(crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3), flip_prob=0.5)
  seeds = tf.constant([[3, 1], [3, 2]], tf.int64)
  # The same windows on the already-decoded pixels (re-encoded losslessly as PNG).
  decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
  a = host_augment.random_resized_views(tf.constant(jpeg), seeds, (cfg, cfg), 32).numpy()
  b = host_augment.random_resized_views(tf.constant(_png(decoded)), seeds, (cfg, cfg), 32).numpy()
  # Decoding a sub-window can differ by IDCT rounding at block edges only.
  assert np.abs(as_unit(a) - as_unit(b)).mean() < 1.0 / 255
