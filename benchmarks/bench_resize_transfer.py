r"""How the reference's bicubic-on-float view should travel from host to device.

The reference resizes each crop bicubically on float and clips to [0, 1]
(float32). The host can ship that as float32, float16, bfloat16, or rounded
to uint8. For each this prints:

* the largest and mean |difference| to the float32 view, on ImageNet-like
  375x500 JPEGs (smooth content, hard edges, grain; q90) at 224 px and on
  32x32 JPEGs at 32 px, over every pixel of two views per image;
* the bytes per training step (two views) at 224 px batch 4096 and 32 px
  batch 256;
* the host CPU milliseconds per two-view image of the whole host path
  (`host_augment.random_resized_views`: decode, reference crop, resize, cast,
  flip) in a one-thread tf.data pipeline with batching, next to the
  torchvision-style bilinear uint8 path.

  .venv/bin/python benchmarks/bench_resize_transfer.py
"""

import argparse
import io
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from byol_jax.tf_import import import_tensorflow  # noqa: E402
from byol_jax.views import host_augment  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "uint8")
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
STEPS = ((224, 4096), (32, 256))


def make_jpegs(count, height, width, seed):
  """Smooth random colour fields with hard-edged blocks and grain, as q90 JPEGs."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    coarse = rng.random((max(2, height // 16), max(2, width // 16), 3)) * 255
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height),
                                                                       Image.BICUBIC), np.float32)
    for _ in range(6):  # hard edges, where bicubic overshoots
      y, x = rng.integers(0, height), rng.integers(0, width)
      image[y:y + height // 4, x:x + width // 4] = rng.choice([0.0, 255.0], 3)
    image += rng.normal(0, 12, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def views(tf, jpegs, size, resize, dtype, seed=0):
  """Two host views of each JPEG, shipped as `dtype`, as float32 in [0, 1]."""
  cfg = dict(crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3), flip_prob=0.5)
  with mock.patch.dict(host_augment.VIEW_DTYPES, {resize: dtype}):
    fn = tf.function(lambda c, s: host_augment.random_resized_views(c, s, (cfg, cfg), size,
                                                                    resize=resize))
    out = [fn(tf.constant(c), tf.constant([[seed, i], [seed + 1, i]], tf.int64)).numpy()
           for i, c in enumerate(jpegs)]
  out = np.stack(out)
  return out / 255.0 if out.dtype == np.uint8 else out.astype(np.float32)


def host_ms(tf, jpegs, size, resize, dtype, repeat):
  """CPU ms per two-view image of the host path in a 1-thread tf.data pipeline."""
  cfg = dict(crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3), flip_prob=0.5)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  with mock.patch.dict(host_augment.VIEW_DTYPES, {resize: dtype}):
    ds = (tf.data.Dataset.from_tensor_slices(jpegs).repeat(repeat).enumerate()
          .map(lambda i, c: host_augment.random_resized_views(
              c, tf.stack([tf.stack([tf.constant(0, tf.int64), i]),
                           tf.stack([tf.constant(1, tf.int64), i])]), (cfg, cfg), size,
              resize=resize))
          .batch(64).prefetch(1).with_options(options))
    for _ in ds.take(1):
      pass
    start, count = time.process_time(), 0
    for batch in ds:
      count += batch.shape[0]
  return (time.process_time() - start) / count * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=48, help="JPEGs per size")
  parser.add_argument("--repeat", type=int, default=8, help="passes for the CPU timing")
  args = parser.parse_args()
  tf = import_tensorflow()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  sources = {224: make_jpegs(args.images, 375, 500, 0), 32: make_jpegs(args.images, 32, 32, 1)}

  print("Difference to the reference's float32 view (bicubic, / 255, clipped):")
  for size, jpegs in sources.items():
    ref = views(tf, jpegs, size, "bicubic", "float32")
    for dtype in DTYPES:
      d = np.abs(views(tf, jpegs, size, "bicubic", dtype) - ref)
      print(f"  {size:>3} px  {dtype:<9} max {d.max():.2e}  mean {d.mean():.2e}  "
            f"(max in 8-bit levels: {d.max() * 255:.3f})")

  print("Bytes per step, two views:")
  for size, batch in STEPS:
    values = 2 * batch * size * size * 3
    sizes = ", ".join(f"{d} {values * BYTES[d] / 1e6:,.1f} MB" for d in DTYPES)
    print(f"  {size:>3} px batch {batch}: {sizes}")

  print("Host CPU ms per two-view image (decode, crop, resize, cast, flip, batch; 1 thread):")
  for size, jpegs in sources.items():
    for resize, dtype in [("bilinear", "uint8")] + [("bicubic", d) for d in DTYPES]:
      ms = host_ms(tf, jpegs, size, resize, dtype, args.repeat)
      print(f"  {size:>3} px  {resize:<8} -> {dtype:<9} {ms:.3f} ms", flush=True)


if __name__ == "__main__":
  main()
