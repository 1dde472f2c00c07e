r"""Reference-style colour ops: byol_jax's hand-written JAX ops against dm-pix.

Times one batch of two views (64 examples each, both default view configs,
tf_image colour semantics) under jit + vmap at 32, 96 and 224 px, three ways
on the same sampled parameters:

* hand-written: `device_augment.apply_view_params` (what training runs);
* dm-pix, reference layout: dm-pix ops arranged as the released BYOL code
  does (every jitter op at each of the 4 order positions, selected per
  example; the blur a per-example depthwise convolution);
* dm-pix ops, our layout: dm-pix's op functions in byol_jax's hue-once
  `lax.scan` arrangement, blur still dm-pix's convolution;
* and, for scale, the hand-written torchvision-style alternative.

It prints ms per batch (median of --repeats, after one compiled warm-up) and
the largest difference of each dm-pix variant from the hand-written result,
batched, and per example (one image at a time, jitted): a variant that is
right per example but wrong batched has the fused-comparison problem that
`device_augment.adjust_hue` avoids.

  .venv/bin/python benchmarks/bench_color_ops.py            # needs dm-pix
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from byol_jax.configs import base  # noqa: E402
from byol_jax.views import device_augment as da  # noqa: E402


def _pix():
  try:
    import dm_pix  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("dm-pix is not installed: .venv/bin/pip install dm-pix")
  return dm_pix


def pix_ops(pix):
  """The four jitter ops as dm-pix defines them, indexed like device_augment's order."""
  return (lambda x, p: pix.adjust_brightness(x, p["brightness"]),
          lambda x, p: pix.adjust_contrast(x, p["contrast"]),
          lambda x, p: pix.adjust_saturation(x, p["saturation"]),
          lambda x, p: pix.adjust_hue(x, p["hue"]))


def pix_reference_layout(pix, image, params, cfg):
  """The released code's structure: at each order position, every op, selected."""
  ops = pix_ops(pix)
  x = image
  for position in range(4):
    idx = params["order"][position]
    for i, op in enumerate(ops):
      x = jnp.where(idx == i, jnp.clip(op(x, params), 0.0, 1.0), x)
  x = jnp.where(params["jitter"], x, image)
  return _pix_tail(pix, x, params, cfg)


def pix_our_layout(pix, image, params, cfg):
  """dm-pix's ops in device_augment's hue-once scan arrangement."""
  brightness, contrast, saturation, hue = pix_ops(pix)
  order = params["order"]
  hue_step = jnp.argmax(order == 3)
  before = jnp.where(jnp.arange(3) < hue_step, order[:3], 4)
  after = jnp.where(jnp.arange(1, 4) > hue_step, order[1:], 4)

  def step(x, op):
    y = jnp.where(op == 0, brightness(x, params),
                  jnp.where(op == 1, contrast(x, params),
                            jnp.where(op == 2, saturation(x, params), x)))
    return jnp.clip(y, 0.0, 1.0), None

  x, _ = jax.lax.scan(step, image, before)
  x = jnp.clip(hue(x, params), 0.0, 1.0)
  x, _ = jax.lax.scan(step, x, after)
  x = jnp.where(params["jitter"], x, image)
  return _pix_tail(pix, x, params, cfg)


def _pix_tail(pix, x, params, cfg):
  x = jnp.where(params["grayscale"], jnp.broadcast_to(pix.rgb_to_grayscale(x), x.shape), x)
  if cfg["blur_prob"] > 0 and da.blur_kernel_radius(x.shape[0]) > 0:
    blurred = pix.gaussian_blur(x, params["sigma"], x.shape[0] / 10.0, padding="SAME")
    x = jnp.where(params["blur"], blurred, x)
  if cfg["solarize_prob"] > 0:
    x = jnp.where(params["solarize"], pix.solarize(x, cfg["solarize_threshold"]), x)
  return jnp.clip(x, 0.0, 1.0)


def time_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64, help="examples per view")
  parser.add_argument("--sizes", default="32,96,224")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  pix = _pix()
  c = base.get_base_config()
  views = (c.augment.view1, c.augment.view2)
  print(f"jax {jax.__version__} on {jax.default_backend()}, dm-pix {pix.__version__}; "
        f"batch {args.batch} x 2 views, tf_image colour ops; ms per batch (median of "
        f"{args.repeats})")
  for size in (int(s) for s in args.sizes.split(",")):
    rng = np.random.default_rng(size)
    images = jnp.asarray(rng.random((2, args.batch, size, size, 3)), jnp.float32)
    params = [jax.vmap(lambda k, v=v: da.sample_view_params(k, v))(
        jax.random.split(jax.random.PRNGKey(v_i), args.batch)) for v_i, v in enumerate(views)]
    impls = {
        "hand-written": lambda i, p, v: da.apply_view_params(i, p, v),
        "dm-pix, reference layout": functools.partial(pix_reference_layout, pix),
        "dm-pix ops, our layout": functools.partial(pix_our_layout, pix),
        # For scale only: the torchvision-style alternative (other ops, no diff).
        "hand-written, torchvision": lambda i, p, v: da.apply_view_params(i, p, v, "torchvision"),
    }
    outputs = {}
    for name, impl in impls.items():
      def both(images, params, impl=impl):
        return [jax.vmap(lambda i, p, v=v: impl(i, p, v))(images[n], params[n])
                for n, v in enumerate(views)]
      fn = jax.jit(both)
      ms = time_ms(fn, (images, params), args.repeats)
      if name.endswith("torchvision"):
        print(f"{size:>4} px  {name:<26} {ms:9.1f} ms", flush=True)
        continue
      outputs[name] = [np.asarray(o) for o in fn(images, params)]
      one = jax.jit(lambda i, p, impl=impl: impl(i, p, views[1]))
      single = np.stack([np.asarray(one(images[1, r], {k: v[r] for k, v in params[1].items()}))
                         for r in range(8)])
      ref = outputs["hand-written"]
      batched_diff = max(float(np.abs(o - r).max()) for o, r in zip(outputs[name], ref))
      single_diff = float(np.abs(single - ref[1][:8]).max())
      print(f"{size:>4} px  {name:<26} {ms:9.1f} ms   max |diff| to hand-written: batched "
            f"{batched_diff:.1e}, per example {single_diff:.1e}", flush=True)


if __name__ == "__main__":
  main()
