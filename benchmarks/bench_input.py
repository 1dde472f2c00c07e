r"""Input-pipeline throughput: host two-view images/s per CPU core, and device augmentation cost.

  python benchmarks/bench_input.py [--sizes 32,224] [--threads 1] [--batches 40]

Host figures come from `input_pipeline.pretrain_dataset` exactly as training
uses it (decode, random resized crop, resize, flip, two uint8 views, batching)
on a tf.data private thread pool of `--threads` threads, and are reported per
CPU-second of this process (user + system time of all its threads), which is
"two-view images per second per core" and stays meaningful on a shared,
busy machine where wall-clock time does not. Wall-clock rates are printed too.

* 32 px: the real CIFAR-10 JPEGs from ../shared/data/cifar10/cifar10_jpeg.zip.
* 224 px: ImageNet-sized JPEGs made in a temporary folder by upscaling real
  CIFAR-10 images to 500x375 (bicubic), adding Gaussian grain of --grain
  levels (upscaled 32 px images are unrealistically smooth and small; grain
  brings the file size near ImageNet's ~110 KB average) and saving at q90.
  Read from a directory tree, like an ImageNet folder.

It also measures the colour ops (jitter, grayscale, blur, solarize) both ways:
in TF on the host (per-image CPU cost that would be added to the pipeline) and
in JAX via `device_augment.device_augment` (here on this machine's CPU backend; on an
accelerator they run inside the update step).
"""

import argparse
import functools
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from byol_jax import tf_import  # noqa: E402
from byol_jax.configs import base  # noqa: E402
from byol_jax.data import input_pipeline  # noqa: E402
from byol_jax.views import device_augment  # noqa: E402

DEFAULT_ZIP = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10", "cifar10_jpeg.zip")


def make_imagenet_like_jpegs(cifar_zip: str, out_dir: str, count: int, grain: float,
                             seed: int = 0) -> float:
  """Writes `count` 500x375 q90 JPEGs under out_dir/train/<class>/; returns mean bytes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  sizes = []
  with zipfile.ZipFile(cifar_zip) as zf:
    names = sorted(n for n in zf.namelist() if n.startswith("train/"))[::50][:count]
    for i, name in enumerate(names):
      small = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
      big = np.asarray(small.resize((500, 375), Image.BICUBIC), np.float32)
      if grain > 0:
        big = big + rng.normal(0.0, grain, big.shape)
      image = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))
      path = os.path.join(out_dir, "train", name.split("/")[1], f"{i:05d}.jpg")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      image.save(path, "JPEG", quality=90)
      sizes.append(os.path.getsize(path))
  return float(np.mean(sizes))


def pipeline_config(path: str, size: int, batch: int):
  c = base.get_base_config()
  c.batch_size = batch
  c.data.source = "folder"
  c.data.path = path
  c.data.train_split = "train"
  c.data.image_size = size
  return c


def measure(iterator, batches: int, warmup: int, images_per_batch: int):
  """(images per CPU-second, images per wall-second) over `batches` batches."""
  for _ in range(warmup):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(iterator)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = batches * images_per_batch
  return n / cpu, n / wall


def host_pipeline(path: str, size: int, batch: int, threads: int, batches: int,
                  kind: str = "pretrain"):
  """The host pipeline of `kind`: "pretrain" (two views), "linear" (linear_eval's one
  cropped view) or "eval" (evaluation's centre crop); (images per CPU-s, per wall-s)."""
  tf = tf_import.import_tensorflow()
  cfg = pipeline_config(path, size, batch)
  common = dict(process_index=0, process_count=1)
  if kind == "pretrain":
    ds = input_pipeline.pretrain_dataset(cfg, start_step=0, **common)
  elif kind == "linear":
    ds = input_pipeline.linear_train_dataset(cfg, batch_size=batch, start_step=0, **common)
  else:
    ds = input_pipeline.eval_dataset(cfg, "train", batch_size=batch, **common).repeat()
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  ds = ds.with_options(options)
  return measure(ds.as_numpy_iterator(), batches, warmup=3, images_per_batch=batch)


# --- The colour ops written in TF, only to measure what they would cost on the host. ---

def tf_color_ops(image, seed, cfg):
  """TF version of the device ops for one uint8 view (same distribution as device_augment)."""
  tf = tf_import.import_tensorflow()
  s = tf.random.experimental.stateless_split(seed, 10)
  coin = lambda i, p: tf.random.stateless_uniform([], s[i]) < p
  uniform = lambda i, lo, hi: tf.random.stateless_uniform([], s[i], minval=lo, maxval=hi)
  x = tf.cast(image, tf.float32) / 255.0

  def jitter(x):
    b, c, sa = cfg.brightness, cfg.contrast, cfg.saturation
    ops = [
        lambda y: y * uniform(1, max(0.0, 1 - b), 1 + b),
        lambda y: tf.image.adjust_contrast(y, uniform(2, max(0.0, 1 - c), 1 + c)),
        lambda y: tf.image.adjust_saturation(y, uniform(3, max(0.0, 1 - sa), 1 + sa)),
        lambda y: tf.image.adjust_hue(y, uniform(4, -cfg.hue, cfg.hue)),
    ]
    order = tf.argsort(tf.random.stateless_uniform([4], s[5]))
    for step in range(4):
      x = tf.clip_by_value(tf.switch_case(order[step], [functools.partial(f, x) for f in ops]),
                           0.0, 1.0)
    return x

  def blur(x):
    radius = device_augment.blur_kernel_radius(int(x.shape[0]))
    sigma = uniform(8, *cfg.blur_sigma)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(offsets / sigma))
    k = k / tf.reduce_sum(k)
    pad = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    kv = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
    kh = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
    y = tf.nn.depthwise_conv2d(pad, kv, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(y, kh, [1, 1, 1, 1], "VALID")[0]

  # On the host a tf.cond really skips an op that was not drawn.
  x = tf.cond(coin(0, cfg.color_jitter_prob), lambda: jitter(x), lambda: x)
  x = tf.cond(coin(6, cfg.grayscale_prob),
              lambda: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), lambda: x)
  x = tf.cond(coin(7, cfg.blur_prob), lambda: blur(x), lambda: x)
  x = tf.cond(coin(9, cfg.solarize_prob),
              lambda: tf.where(x < cfg.solarize_threshold, x, 1.0 - x), lambda: x)
  return tf.saturate_cast(tf.round(x * 255.0), tf.uint8)


def host_color_cost(size: int, batch: int, threads: int, batches: int):
  """Two-view images per CPU-second of the colour ops alone, in tf.data on the host."""
  tf = tf_import.import_tensorflow()
  cfg = base.get_base_config().augment
  views = np.random.default_rng(0).integers(0, 256, (64, 2, size, size, 3), np.uint8)

  def both(i, v):
    seed = tf.stack([tf.constant(0, tf.int64), i])
    return (tf_color_ops(v[0], seed, cfg.view1),
            tf_color_ops(v[1], seed + tf.constant([1, 0], tf.int64), cfg.view2))

  ds = tf.data.Dataset.from_tensor_slices(views).repeat().enumerate()
  ds = ds.map(both, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(2)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  return measure(ds.as_numpy_iterator(), batches, warmup=2, images_per_batch=batch)


def device_cost(size: int, batch: int, repeats: int):
  """(ms per batch of two views, two-view images per CPU-second) of device_augment (JAX)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cfg = base.get_base_config()
  fn = device_augment.make_augment_fn(cfg)

  @jax.jit
  def both(images, key):
    k1, k2 = jax.random.split(key)
    return fn(images[0], k1, 0), fn(images[1], k2, 1)

  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, batch, size, size, 3),
                                                         np.uint8))
  jax.block_until_ready(both(images, jax.random.PRNGKey(0)))
  wall, cpu = time.perf_counter(), time.process_time()
  for i in range(repeats):
    jax.block_until_ready(both(images, jax.random.PRNGKey(i)))
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return wall / repeats * 1e3, batch * repeats / cpu, jax.devices()[0].platform


def pil_baseline(path: str, size: int, count: int = 200):
  """Two-view images per CPU-second decoding and cropping with PIL in Python.

  The alternative to TF's decoders (e.g. inside tf.numpy_function): Image.open,
  convert to RGB, then per view a random crop resized with bilinear filtering
  and a flip. Single thread, no tf.data overhead at all.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if os.path.isfile(path):
    with zipfile.ZipFile(path) as zf:
      blobs = [zf.read(n) for n in sorted(zf.namelist()) if n.endswith(".jpg")][:count]
  else:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)[:count]
    blobs = [open(f, "rb").read() for f in files]
  rng = np.random.default_rng(0)
  cpu = time.process_time()
  for blob in blobs:
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = image.size
    for _ in range(2):
      side = int(min(w, h) * rng.uniform(0.3, 1.0))
      x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
      view = image.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))
      if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
      np.asarray(view)
  return len(blobs) / (time.process_time() - cpu)


def micro(path: str, size: int, repeats: int = 200):
  """CPU ms of the single ops the 224 px host path is made of, on one JPEG."""
  tf = tf_import.import_tensorflow()
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
  data = tf.constant(open(files[0], "rb").read())
  image = tf.io.decode_jpeg(data, channels=3)
  h, w = int(image.shape[0]), int(image.shape[1])
  crop = image[h // 8: h // 8 + int(h * 0.7), w // 8: w // 8 + int(w * 0.7)]
  box = tf.constant([[0.125, 0.125, 0.825, 0.825]] * 2)
  ops = {
      "decode_jpeg, full image": lambda: tf.io.decode_jpeg(data, channels=3),
      "decode_and_crop_jpeg, 70% x 70% window": lambda: tf.io.decode_and_crop_jpeg(
          data, [h // 8, w // 8, int(h * 0.7), int(w * 0.7)], channels=3),
      "2 views: slice + resize bilinear (used)": lambda: [
          tf.image.resize(crop, [size, size]) for _ in range(2)],
      "2 views: slice + resize bilinear antialias": lambda: [
          tf.image.resize(crop, [size, size], antialias=True) for _ in range(2)],
      "2 views: slice + resize bicubic": lambda: [
          tf.image.resize(crop, [size, size], method="bicubic") for _ in range(2)],
      "2 views: one crop_and_resize call": lambda: tf.image.crop_and_resize(
          tf.cast(image, tf.float32)[None], box, [0, 0], [size, size]),
  }
  results = {}
  for name, op in ops.items():
    fn = tf.function(op)
    fn()
    cpu = time.process_time()
    for _ in range(repeats):
      fn()
    results[name] = (time.process_time() - cpu) / repeats * 1e3
  return (h, w), results


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cifar_zip", default=DEFAULT_ZIP)
  parser.add_argument("--sizes", default="32,224", help="comma-separated image sizes")
  parser.add_argument("--threads", type=int, default=1, help="tf.data private thread pool size")
  parser.add_argument("--batches", type=int, default=40, help="measured batches per figure")
  parser.add_argument("--batch32", type=int, default=256)
  parser.add_argument("--batch224", type=int, default=32)
  parser.add_argument("--num_jpegs", type=int, default=256, help="224 px: synthetic JPEGs")
  parser.add_argument("--grain", type=float, default=20.0, help="224 px: grain std (0-255)")
  parser.add_argument("--skip", default="", help="comma list of parts to skip: "
                      "host,linear,eval,color,pil,micro,device")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  if not os.path.exists(args.cifar_zip):
    raise SystemExit(f"{args.cifar_zip} not found; pass --cifar_zip.")
  print(f"CPU cores visible: {os.cpu_count()}, tf.data threads: {args.threads}, "
        f"load average: {os.getloadavg()[0]:.1f}")

  for size in [int(s) for s in args.sizes.split(",")]:
    batch = args.batch32 if size <= 64 else args.batch224
    tmp = None
    try:
      if size <= 64:
        path, what = args.cifar_zip, "real CIFAR-10 JPEGs (shared zip)"
      else:
        tmp = tempfile.mkdtemp(prefix="bench_input_")
        mean_bytes = make_imagenet_like_jpegs(args.cifar_zip, tmp, args.num_jpegs, args.grain)
        path = tmp
        what = (f"{args.num_jpegs} 500x375 q90 JPEGs, grain {args.grain:g}, "
                f"mean {mean_bytes / 1e3:.0f} KB, directory tree")
      print(f"\n== {size} px: {what}, batch {batch}")
      if "host" not in skip:
        per_cpu, per_wall = host_pipeline(path, size, batch, args.threads, args.batches)
        print(f"host pipeline (decode+crop+resize+flip, 2 views): {per_cpu:,.0f} two-view "
              f"images per CPU-second ({per_wall:,.0f}/s wall)")
      for kind, what in (("linear", "linear_eval's view (decode+crop+resize+flip, 1 view)"),
                         ("eval", "evaluation's centre crop (decode+crop+resize)")):
        if kind not in skip:
          per_cpu, per_wall = host_pipeline(path, size, batch, args.threads, args.batches, kind)
          print(f"host pipeline, {what}: {per_cpu:,.0f} images per CPU-second "
                f"({per_wall:,.0f}/s wall)")
      if "color" not in skip:
        per_cpu, per_wall = host_color_cost(size, batch, args.threads, max(5, args.batches // 4))
        print(f"colour ops in TF on the host (jitter, gray, blur, solarize; 2 views): "
              f"{per_cpu:,.0f} two-view images per CPU-second = {1e3 / per_cpu:.3f} ms CPU "
              f"per image")
      if "pil" not in skip:
        print(f"PIL decode + 2 crops/resizes/flips in plain Python (baseline): "
              f"{pil_baseline(path, size):,.0f} two-view images per CPU-second")
      if "micro" not in skip and tmp:
        (h, w), results = micro(path, size)
        for name, ms in results.items():
          print(f"  micro ({h}x{w} JPEG -> {size}): {name}: {ms:.3f} ms CPU")
      if "device" not in skip:
        ms, per_cpu, platform = device_cost(size, batch, repeats=5)
        print(f"colour ops in JAX (device_augment, both views) on {platform}: {ms:.1f} ms per "
              f"batch of {batch}, {per_cpu:,.0f} two-view images per CPU-second")
    finally:
      if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
