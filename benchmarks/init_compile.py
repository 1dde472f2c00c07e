r"""Init's XLA:CPU compile: default against `train_step.CPU_INIT_COMPILE_OPTIONS`.

  python benchmarks/init_compile.py [--configs=demo,resnet50_imagenet] [--image_size=32] \
      [--draws=10]

For each named config (at its own image size, or --image_size where given: the
parameters do not depend on it), prints the compile seconds of `init_state`
both ways and how many of the state's leaves differ, with the largest difference
(the parameters must not; BN averages of init's dummy batch may, by rounding).
With --draws=N it first times N `jax.random.bits` draws of distinct 4-D
conv-kernel shapes in one program: default, with `jax_threefry_partitionable`
off (other bits), and at the options (same bits). One process, one device;
compile times are wall seconds on whatever else the machine runs.
"""

import argparse
import time

import jax
import numpy as np

from byol_jax import config_lib
from byol_jax.model import networks
from byol_jax.train import optim, train_step


def _timed_compile(fn, options=None):
  lowered = jax.jit(fn).lower()
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=options)
  return time.perf_counter() - start, jax.device_get(compiled())


def random_draws(draws: int) -> None:
  def fn():
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    return [jax.random.bits(keys[i], (3, 3, 8, 8 + i)) for i in range(draws)]

  _timed_compile(lambda: jax.random.bits(jax.random.PRNGKey(0), (4,)))  # XLA's first-use cost
  seconds, bits = _timed_compile(fn)
  print(f"{draws} threefry draws: default {seconds:.2f} s", flush=True)
  fast, fast_bits = _timed_compile(fn, train_step.CPU_INIT_COMPILE_OPTIONS)
  same = all(np.array_equal(a, b) for a, b in zip(bits, fast_bits))
  print(f"{draws} threefry draws: options {fast:.2f} s, bits {'same' if same else 'DIFFER'}",
        flush=True)
  with jax.threefry_partitionable(False):
    seconds, other = _timed_compile(fn)
  same = all(np.array_equal(a, b) for a, b in zip(bits, other))
  print(f"{draws} threefry draws: unpartitionable {seconds:.2f} s, bits "
        f"{'same' if same else 'differ'}", flush=True)


def init_state(name: str, image_size: int) -> None:
  config = config_lib.load(name)
  if image_size:
    config.data.image_size = image_size
  nets = networks.make_networks(config.model, max(config.data.num_classes, 1))
  init = train_step.initial_state_fn(config, nets, optim.make_optimizer(config))
  default_s, default = _timed_compile(init)
  fast_s, fast = _timed_compile(init, train_step.CPU_INIT_COMPILE_OPTIONS)
  leaves = jax.tree_util.tree_leaves_with_path(default)
  differ = [(jax.tree_util.keystr(path), float(np.max(np.abs(a - b))))
            for (path, a), b in zip(leaves, jax.tree.leaves(fast)) if not np.array_equal(a, b)]
  params_differ = [p for p, _ in differ if "params" in p]
  largest = max((d for _, d in differ), default=0.0)
  print(f"{name} init at {config.data.image_size} px: default {default_s:.2f} s, options "
        f"{fast_s:.2f} s; {len(differ)} of {len(leaves)} leaves differ (largest {largest:.2g}), "
        f"{len(params_differ)} of them parameters", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="demo,resnet50_imagenet")
  parser.add_argument("--image_size", type=int, default=0)
  parser.add_argument("--draws", type=int, default=10)
  args = parser.parse_args()
  if args.draws:
    random_draws(args.draws)
  for name in args.configs.split(","):
    init_state(name, args.image_size)


if __name__ == "__main__":
  main()
