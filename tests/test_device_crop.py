"""The device-side crop: the host crop's window distributions and resize, per-example
randomness independent of the batch layout and of the device count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax import tf_import
from byol_jax.configs import base
from byol_jax.data import batch as batch_lib
from byol_jax.data import stream_index
from byol_jax.views import device_crop, host_augment

N = 5000  # windows per distribution comparison
# Two samples of N draws from one distribution have a KS distance under this with
# p > 0.999; the reference and Inception crops' areas differ by 0.10 on 32x32.
KS_TOLERANCE = 0.045


@pytest.fixture(scope="module")
def tf():
  return tf_import.import_tensorflow()


def host_windows(tf, height, width, area, aspect, crop):
  fn = tf.function(lambda seeds: tf.map_fn(
      lambda seed: host_augment.sample_crop_window(seed, height, width, area, aspect, crop), seeds,
      fn_output_signature=tf.int32))
  seeds = tf.stack([tf.fill([N], tf.constant(5, tf.int64)), tf.range(N, dtype=tf.int64)], 1)
  return fn(seeds).numpy().astype(float)


def device_windows(height, width, area, aspect, crop):
  keys = jax.random.split(jax.random.PRNGKey(9), N)
  fn = jax.jit(jax.vmap(lambda k: jnp.stack(device_crop.WINDOWS[crop](k, height, width, area,
                                                                         aspect))))
  return np.asarray(fn(keys), float)


def ks_distance(a, b):
  """Largest gap between the two empirical CDFs."""
  grid = np.union1d(a, b)
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
  return float(np.max(np.abs(cdf(a) - cdf(b))))


@pytest.mark.parametrize("crop", ["reference", "inception"])
@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_windows_have_the_host_crops_distribution(tf, crop, height, width):
  area, aspect = (0.08, 1.0), (3 / 4, 4 / 3)
  host = host_windows(tf, height, width, area, aspect, crop)
  dev = device_windows(height, width, area, aspect, crop)
  y, x, h, w = dev.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  assert (dev == np.round(dev)).all()  # whole pixels
  features = lambda win: {"y": win[:, 0], "x": win[:, 1], "h": win[:, 2], "w": win[:, 3],
                          "area": win[:, 2] * win[:, 3], "aspect": win[:, 3] / win[:, 2]}
  for name, values in features(dev).items():
    assert ks_distance(values, features(host)[name]) < KS_TOLERANCE, name


def test_the_distribution_comparison_tells_the_crop_styles_apart(tf):
  area = lambda win: win[:, 2] * win[:, 3]
  dev = device_windows(32, 32, (0.08, 1.0), (3 / 4, 4 / 3), "reference")
  host = host_windows(tf, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), "inception")
  assert ks_distance(area(dev), area(host)) > 2 * KS_TOLERANCE
  assert 0.5 < np.mean(area(dev)) / 1024 < 0.55  # E[U(0.08, 1)] = 0.54, a little less clamped


@pytest.mark.parametrize("resize,atol", [("bilinear", 1e-4), ("bicubic", 2e-3)])
@pytest.mark.parametrize("window", [(3, 5, 20, 13), (0, 0, 24, 30), (10, 2, 7, 9)])
def test_resize_matches_tf_on_the_cropped_window(tf, resize, atol, window):
  image = np.random.default_rng(0).integers(0, 256, (24, 30, 3), np.uint8)
  y, x, h, w = window
  expected = tf.image.resize(image[y:y + h, x:x + w].astype(np.float32), [16, 16], method=resize,
                             antialias=False).numpy() / 255.0
  if resize == "bicubic":
    expected = np.clip(expected, 0.0, 1.0)
  got = np.asarray(device_crop.resize_window(jnp.asarray(image), window, False, 16, resize))
  np.testing.assert_allclose(got, expected, atol=atol)
  flipped = device_crop.resize_window(jnp.asarray(image), window, True, 16, resize)
  np.testing.assert_allclose(np.asarray(flipped), expected[:, ::-1], atol=atol)


@pytest.mark.parametrize("height,width,fraction", [(32, 32, 1.0), (40, 28, 0.875), (33, 50, 0.5)])
def test_center_window_matches_the_host(tf, height, width, fraction):
  host = host_augment.center_crop_window(height, width, fraction).numpy()
  assert tuple(host) == device_crop.center_window(height, width, fraction)


def test_flip_fraction_follows_flip_prob():
  image = np.zeros((1, 8, 8, 3), np.uint8)
  image[:, :, 4:] = 255  # right half white: a flipped view has it on the left
  cfg = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_prob=0.3)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  views = device_crop.random_views(jnp.broadcast_to(image, (2000, 8, 8, 3)), keys, cfg, 8)
  views = np.asarray(views)
  flipped = views[:, 0, 0, 0] > 0.5
  unflipped = views[~flipped]
  np.testing.assert_allclose(unflipped, np.broadcast_to(image[0] / 255.0, unflipped.shape),
                             atol=1e-6)  # a full window is exact
  assert abs(flipped.mean() - 0.3) < 0.04


def batch_of(n, size=12, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, size, size, 3), np.uint8),
          "crop_seed": stream_index.crop_seeds(0, stream_index.TAG_PRETRAIN, 2, np.arange(n))}


def test_views_of_an_example_do_not_depend_on_its_neighbours():
  cfg = base.get_base_config()
  cfg.data.image_size = 8
  batch = batch_of(8)
  views = np.asarray(batch_lib.raw_views(cfg, batch))
  order = np.random.default_rng(1).permutation(8)
  permuted = {k: v[order] for k, v in batch.items()}
  np.testing.assert_allclose(np.asarray(batch_lib.raw_views(cfg, permuted)),
                             views[:, order], atol=1e-6)
  assert not np.allclose(views[0], views[1])  # the two views differ


def test_views_do_not_depend_on_the_device_count():
  devices = jax.devices()
  assert len(devices) == 8, "conftest.py asks XLA for 8 CPU devices"
  cfg = base.get_base_config()
  cfg.data.image_size = 8
  batch = batch_of(16)
  fn = jax.jit(lambda b: batch_lib.raw_views(cfg, b))
  single = np.asarray(fn(batch))
  sharded = jax.device_put(batch, NamedSharding(Mesh(np.asarray(devices), ("data",)), P("data")))
  np.testing.assert_allclose(np.asarray(fn(sharded)), single, atol=1e-6)


def test_host_views_pass_through_and_bad_shapes_are_rejected():
  cfg = base.get_base_config()
  views = {"view1": np.zeros((2, 4, 4, 3), np.uint8), "view2": np.ones((2, 4, 4, 3), np.uint8)}
  assert batch_lib.raw_views(cfg, views)[1] is views["view2"]
  with pytest.raises(ValueError, match=r"needs \('view1', 'view2'\) or \('image', 'crop_seed'\)"):
    batch_lib.raw_views(cfg, {"image": views["view1"], "label": np.zeros(2, np.int32)})
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    device_crop.crop_views(np.zeros((2, 4, 4), np.uint8), batch_of(2)["crop_seed"],
                           [cfg.augment.view1], 4)
  with pytest.raises(ValueError, match="crop style"):
    device_crop.random_views(np.zeros((2, 4, 4, 3), np.uint8), jax.random.split(
        jax.random.PRNGKey(0), 2), cfg.augment.view1, 4, crop="square")


def test_crop_seeds_are_distinct_and_a_function_of_position():
  seeds = stream_index.crop_seeds(3, stream_index.TAG_PRETRAIN, 2, np.arange(1000))
  assert seeds.shape == (1000, 2, 2) and seeds.dtype == np.uint32
  flat = seeds.reshape(-1, 2)
  assert len({tuple(s) for s in flat}) == 2000  # every (position, view) its own key
  np.testing.assert_array_equal(
      stream_index.crop_seeds(3, stream_index.TAG_PRETRAIN, 2, np.arange(500, 510)),
      seeds[500:510])
  assert not np.array_equal(stream_index.crop_seeds(4, stream_index.TAG_PRETRAIN, 2,
                                                    np.arange(10)), seeds[:10])
