r"""Speed of the BYOL update step and the forward-only evaluation step.

Prints, for a named config and batch size: compile time, steady-state images/s,
the step's FLOPs from XLA's cost analysis, achieved FLOP/s and its fraction of
a measured matmul peak on the same machine, and the peak host memory. The input
pipeline is measured separately by bench_input.py; both together say whether
input or compute bounds a run.

  python benchmarks/bench_step.py --config=demo --batch_size=64
  python benchmarks/bench_step.py --config=resnet50_imagenet --batch_size=256 --image_size=224
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/bench_step.py --config=demo --batch_size=64 --devices=8
"""

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import config_lib, networks, parallel, train_step


def matmul_peak(seconds: float = 2.0, n: int = 2048, dtype=jnp.float32) -> float:
  """FLOP/s of a large square matmul on the first device: a practical peak."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    f(a).block_until_ready()
    count += 1
  return 2 * n**3 * count / (time.perf_counter() - start)


def timed(fn, args, min_seconds: float, min_iters: int = 3):
  """Runs fn until min_seconds and min_iters pass; returns seconds per call."""
  out = fn(*args)
  jax.block_until_ready(out)
  count, start = 0, time.perf_counter()
  while count < min_iters or time.perf_counter() - start < min_seconds:
    out = fn(*args)
    args = (out[0],) + tuple(args[1:]) if isinstance(out, tuple) else args
    count += 1
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / count


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="demo")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--devices", type=int, default=1, help="mesh size (simulate with XLA_FLAGS)")
  parser.add_argument("--compute_dtype", default=None, choices=(None, "float32", "bfloat16"))
  parser.add_argument("--merge_views_bn", action="store_true")
  parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per measurement")
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  args = parser.parse_args(argv)

  config = config_lib.load(args.config)
  config.batch_size = args.batch_size
  if args.image_size:
    config.data.image_size = args.image_size
  if args.compute_dtype:
    config.compute_dtype = args.compute_dtype
  config.model.merge_views_bn = args.merge_views_bn
  config.steps, config.warmup_steps = 1000, 10
  config = config_lib.finalize(config, num_train_examples=10_000, num_classes=10)
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  parallel.check_batch_size(config.batch_size, mesh)
  size, b = config.data.image_size, config.batch_size

  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = train_step.make_optimizer(config)
  state = jax.jit(lambda: train_step.init_state(config, nets, optimizer, (size, size, 3), 0),
                  out_shardings=parallel.replicated(mesh))()
  from byol_jax import augment  # pylint: disable=g-import-not-at-top
  update = train_step.make_update_fn(config, nets, optimizer, mesh, augment.make_augment_fn(config))
  rng = np.random.default_rng(0)
  batch = parallel.to_global({
      "view1": rng.integers(0, 256, (b, size, size, 3), np.uint8),
      "view2": rng.integers(0, 256, (b, size, size, 3), np.uint8),
      "label": rng.integers(0, 10, (b,), np.int32)}, mesh)

  start = time.perf_counter()
  compiled = update.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  step_s = timed(compiled, (state, batch), args.seconds)
  step_flops = flops_of(compiled)

  embed = train_step.make_embed_fn(nets, mesh)
  images = batch["view1"]
  start = time.perf_counter()
  embed_compiled = embed.lower(state.online_params, state.online_state, images).compile()
  embed_compile_s = time.perf_counter() - start
  embed_s = timed(lambda p, s, x: embed_compiled(p, s, x),
                  (state.online_params, state.online_state, images), args.seconds / 2)
  embed_flops = flops_of(embed_compiled)

  peak = matmul_peak()
  devices = mesh.devices.size
  figures = {
      "config": args.config, "batch_size": b, "image_size": size, "devices": devices,
      "compute_dtype": config.compute_dtype, "merge_views_bn": args.merge_views_bn,
      "device_kind": jax.devices()[0].device_kind,
      "train_compile_s": compile_s,
      "train_step_s": step_s,
      "train_images_per_s": b / step_s,
      # cost_analysis counts one device's program; the step runs on all of them.
      "train_step_gflop": step_flops * devices / 1e9,
      "train_achieved_gflop_per_s": step_flops * devices / step_s / 1e9,
      "eval_compile_s": embed_compile_s,
      "eval_images_per_s": b / embed_s,
      "eval_achieved_gflop_per_s": embed_flops * devices / embed_s / 1e9,
      "matmul_peak_gflop_per_s": peak / 1e9,
      "peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }
  figures["train_fraction_of_matmul_peak"] = figures["train_achieved_gflop_per_s"] / (peak / 1e9)
  width = max(map(len, figures))
  for k, v in figures.items():
    print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)
  return figures


if __name__ == "__main__":
  main(sys.argv[1:])
