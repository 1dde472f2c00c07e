r"""Two ways to run each of two encoder ops, forward + backward, on this machine's backend.

`byol_jax/model/resnet.py` runs every 1x1 convolution as a matmul over channels and
the stem's 3x3 stride-2 max-pool as the maximum of nine strided slices. This
times both choices against XLA's own ops (`lax.conv_general_dilated`,
`lax.reduce_window`) at the shapes of the named ResNet, so the choice can be
rechecked on any backend:

* every distinct 1x1 convolution of the network (input side, channels in and
  out, stride): conv vs matmul, and the total over the network's 1x1 convs
  (each shape times how often it occurs);
* the stem max-pool: reduce_window vs nine slices.

Each time is the median of --repeats calls of the jitted gradient (which runs
the forward too) of a scalar loss, with the input and the kernel both
differentiated, as in training (the stem's input gets no gradient, but its
max-pool's does).

  python benchmarks/bench_ops.py                        # ResNet-50, 224 px, batch 16
  python benchmarks/bench_ops.py --depth=18 --image_size=32 --stem=cifar --batch_size=128
"""

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depth", type=int, default=50)
  parser.add_argument("--width", type=int, default=1)
  parser.add_argument("--base_channels", type=int, default=64)
  parser.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"))
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=16, help="images per call (one view)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  return parser.parse_args(argv)


def pointwise_convs(args) -> collections.Counter:
  """(input side, in channels, out channels, stride) -> count, over the network's 1x1 convs."""
  from byol_jax.model import resnet  # pylint: disable=g-import-not-at-top
  side = args.image_size // 4 if args.stem == "imagenet" else args.image_size
  found = collections.Counter()
  for spec in resnet.layout(args.depth, args.width, args.base_channels):
    if spec.downsample:
      found[(side, spec.in_channels, spec.out_channels, spec.stride)] += 1
    if spec.kind == "bottleneck":
      found[(side, spec.in_channels, spec.channels, 1)] += 1
      found[(-(-side // spec.stride), spec.channels, spec.out_channels, 1)] += 1
    side = -(-side // spec.stride)
  return found


def grad_seconds(fn, shapes, repeats: int) -> float:
  """Median wall seconds of the jitted gradient of sum(sin(fn(*inputs))) w.r.t. all inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
  inputs = [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
  grad = jax.jit(jax.grad(lambda *xs: jnp.sum(jnp.sin(fn(*xs))),
                          argnums=tuple(range(len(inputs)))))
  return bench_step.summarize(bench_step.time_call(grad, inputs, 0.0, 1, steps=repeats))[0]


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol_jax.model import resnet  # pylint: disable=g-import-not-at-top

  fig = bench_step.Figures()
  fig["device_kind"] = jax.devices()[0].device_kind
  fig["depth"], fig["image_size"], fig["batch_size"] = args.depth, args.image_size, args.batch_size
  b = args.batch_size

  def by_conv(stride):
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def by_matmul(stride):
    return lambda x, w: resnet.pointwise_conv(x, w, (stride, stride))

  totals = {"conv": 0.0, "matmul": 0.0}
  for (side, cin, cout, stride), count in sorted(pointwise_convs(args).items()):
    shapes = [(b, side, side, cin), (1, 1, cin, cout)]
    name = f"1x1_{side}px_{cin}to{cout}_s{stride}"
    for kind, make in (("conv", by_conv), ("matmul", by_matmul)):
      seconds = grad_seconds(make(stride), shapes, args.repeats)
      fig[f"{name}_{kind}_ms"] = seconds * 1e3
      totals[kind] += count * seconds
  fig["pointwise_total_conv_ms"] = totals["conv"] * 1e3
  fig["pointwise_total_matmul_ms"] = totals["matmul"] * 1e3
  fig["pointwise_speedup"] = totals["conv"] / totals["matmul"]

  if args.stem == "imagenet":
    side = args.image_size // 2
    channels = args.base_channels * args.width
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    reduce_window = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                                    (1, 2, 2, 1), pads)
    nine_slices = lambda x: resnet.max_pool_3x3_s2(x, "torchvision")
    shape = [(b, side, side, channels)]
    fig["max_pool_reduce_window_ms"] = grad_seconds(reduce_window, shape, args.repeats) * 1e3
    fig["max_pool_nine_slices_ms"] = grad_seconds(nine_slices, shape, args.repeats) * 1e3
    fig["max_pool_speedup"] = fig["max_pool_reduce_window_ms"] / fig["max_pool_nine_slices_ms"]
  return fig.write(args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
