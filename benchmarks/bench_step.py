r"""Speed of the BYOL update step and of the forward-only evaluation step.

For a named config and batch size it prints (and with --json writes):

* compile time of the jitted update step and of the evaluation forward;
* steady-state training images/s (one image = one example, i.e. its two views)
  and evaluation images/s, timed on a fixed synthetic uint8 batch, so the input
  pipeline is NOT included (bench_input.py measures it; compare the two);
* the step's FLOPs from XLA's cost analysis of the compiled program, and an
  independent count of the convolution and matmul FLOPs, read off the traced
  program (jaxpr) by shape arithmetic, of the whole step and of one image's
  encoder and online-network forward. (XLA's count leaves out the taps of a
  convolution that fall on zero padding, so it is a little lower, most at
  small spatial sizes.) A BYOL step is about online forward + backward (~3x forward) on
  two views plus the target forward on two views, i.e. ~8x one forward per
  example; `train_flops_over_8x_forward` checks that;
* achieved FLOP/s and its fraction of a matmul peak measured on the same
  machine in the same run (a 2048^2 matmul in the compute dtype, measured
  before and after, the better kept), by wall time and by CPU time;
* peak host memory (max RSS of this process) and XLA's own buffer sizes.

Timings are the median of --repeats windows of >= --seconds each (the
fastest and slowest window's images/s are printed too), by wall-clock time and
by this process's CPU time (user + system, all threads). On a shared machine
wall-clock rates move with the other processes; the CPU-time rates much less.
The load average is printed at the start and the end.

  python benchmarks/bench_step.py --config=demo --batch_size=64
  python benchmarks/bench_step.py --config=resnet18_cifar10 --batch_size=32
  python benchmarks/bench_step.py --config=demo --merge_views_bn --compute_dtype=bfloat16
  python benchmarks/bench_step.py --config=demo --devices=8   # 8 simulated CPU devices

With --devices=N > 1 on a CPU-only machine the script sets
`--xla_force_host_platform_device_count=N` itself (or give it in XLA_FLAGS);
--host_devices sets that count independently of the mesh size, so that a
1-device mesh can be timed in the same 8-device process.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _set_host_devices(count: int) -> None:
  """Must run before jax is imported: XLA reads the flag once."""
  flags = os.environ.get("XLA_FLAGS", "")
  if count > 1 and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def matmul_peak(dtype, seconds: float = 2.0, n: int = 2048) -> tuple:
  """(FLOP/s, FLOP per CPU-second) of an n x n matmul: a practical peak for this machine."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  count, start, cpu = 0, time.perf_counter(), time.process_time()
  while count < 2 or time.perf_counter() - start < seconds:
    f(a).block_until_ready()
    count += 1
  flops = 2 * n**3 * count
  return flops / (time.perf_counter() - start), flops / (time.process_time() - cpu)


def time_update(compiled, state, batch, min_seconds: float, repeats: int, min_iters: int = 3):
  """Times the update step in `repeats` windows of >= min_seconds each.

  The (donated) state is threaded from step to step; one untimed step first.
  Returns ([(wall s per step, CPU s per step) per window], final state). CPU
  time is this process's user + system time, all threads.
  """
  import jax  # pylint: disable=g-import-not-at-top
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  windows = []
  for _ in range(repeats):
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while count < min_iters or time.perf_counter() - start < min_seconds:
      state, metrics = compiled(state, batch)
      count += 1
    jax.block_until_ready((state, metrics))
    windows.append(((time.perf_counter() - start) / count, (time.process_time() - cpu) / count))
  return windows, state


def time_call(fn, args, min_seconds: float, repeats: int, min_iters: int = 3):
  """Like time_update, for a function that does not donate its arguments."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  windows = []
  for _ in range(repeats):
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while count < min_iters or time.perf_counter() - start < min_seconds:
      out = fn(*args)
      count += 1
    jax.block_until_ready(out)
    windows.append(((time.perf_counter() - start) / count, (time.process_time() - cpu) / count))
  return windows


def summarize(windows):
  """Median wall and CPU seconds per call, and the fastest / slowest window's wall time."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  wall = [w for w, _ in windows]
  return (float(np.median(wall)), float(np.median([c for _, c in windows])), min(wall),
          max(wall))


def xla_flops(compiled) -> float:
  """FLOPs of a compiled program per XLA's cost analysis (one device's program)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def xla_memory_mib(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has it
    return {}
  if m is None:
    return {}
  return {f"xla_{name}_mib": getattr(m, f"{name}_size_in_bytes") / 2**20
          for name in ("argument", "output", "temp")
          if hasattr(m, f"{name}_size_in_bytes")}


def _sub_jaxprs(eqn):
  """(jaxpr, multiplicity) of the programs nested in an equation (jit, scan, remat, ...)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.extend import core  # pylint: disable=g-import-not-at-top (not imported by `import jax`)
  found = []
  for name, value in eqn.params.items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, core.ClosedJaxpr):
        v = v.jaxpr
      if isinstance(v, core.Jaxpr):
        found.append((v, name))
  if eqn.primitive.name == "cond":  # only one branch runs: count the most expensive
    return [(max((j for j, _ in found), key=jaxpr_matmul_flops), 1)] if found else []
  times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
  return [(j, times) for j, _ in found]


def jaxpr_matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every convolution and dot in a jaxpr, from the shapes alone."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
      taps = math.prod(rhs[i] for i in spec[2:])
      total += 2.0 * math.prod(out) * taps * rhs[spec[1]]
    elif name == "dot_general":
      lhs = eqn.invars[0].aval.shape
      (contract, _), _ = eqn.params["dimension_numbers"]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    for sub, times in _sub_jaxprs(eqn):
      total += times * jaxpr_matmul_flops(sub)
  return total


def forward_flops_per_image(nets, params, state, size: int) -> dict:
  """Conv + matmul FLOPs of one image through the encoder and the online network."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol_jax import networks  # pylint: disable=g-import-not-at-top
  image = jnp.zeros((1, size, size, 3), jnp.float32)
  enc_params, enc_state = networks.encoder_subset(params), networks.encoder_subset(state)
  enc = jax.make_jaxpr(lambda x: nets.encoder.apply(enc_params, enc_state, x, False))(image)
  online = jax.make_jaxpr(lambda x: nets.online.apply(params, state, x, False))(image)
  return {"encoder_forward_gflop_per_image": jaxpr_matmul_flops(enc.jaxpr) / 1e9,
          "online_forward_gflop_per_image": jaxpr_matmul_flops(online.jaxpr) / 1e9}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="demo", help="named config or config file")
  parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: "
                      "the config's)")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--base_channels", type=int, default=None, help="ResNet stem width")
  parser.add_argument("--devices", type=int, default=1, help="mesh size")
  parser.add_argument("--host_devices", type=int, default=None,
                      help="simulated CPU devices in the process (default: --devices)")
  parser.add_argument("--compute_dtype", default=None, choices=("float32", "bfloat16"))
  parser.add_argument("--merge_views_bn", action="store_true",
                      help="one BN batch for both views (speed option)")
  parser.add_argument("--seconds", type=float, default=5.0,
                      help="minimum length of one timing window")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timing windows per measurement; the median is reported")
  parser.add_argument("--peak_seconds", type=float, default=2.0,
                      help="timing window of the matmul peak")
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  _set_host_devices(args.host_devices or args.devices)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax import augment, config_lib, networks, parallel, train_step  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config)
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.image_size:
    config.data.image_size = args.image_size
  if args.base_channels:
    config.model.base_channels = args.base_channels
  if args.compute_dtype:
    config.compute_dtype = args.compute_dtype
  config.model.merge_views_bn = args.merge_views_bn
  config.steps, config.warmup_steps = 1000, 10
  config = config_lib.finalize(config, num_train_examples=10_000, num_classes=10)
  if len(jax.devices()) < args.devices:
    raise SystemExit(f"--devices={args.devices} but only {len(jax.devices())} visible; on a "
                     "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N.")
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  parallel.check_batch_size(config.batch_size, mesh)
  size, b = config.data.image_size, config.batch_size
  load_before = os.getloadavg()

  peak_before = matmul_peak(jnp.dtype(config.compute_dtype), args.peak_seconds)
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = train_step.make_optimizer(config)
  state = jax.jit(lambda: train_step.init_state(config, nets, optimizer, (size, size, 3), 0),
                  out_shardings=parallel.replicated(mesh))()
  update = train_step.make_update_fn(config, nets, optimizer, mesh,
                                     augment.make_augment_fn(config))
  rng = np.random.default_rng(0)
  batch = parallel.to_global({
      "view1": rng.integers(0, 256, (b, size, size, 3), np.uint8),
      "view2": rng.integers(0, 256, (b, size, size, 3), np.uint8),
      "label": rng.integers(0, 10, (b,), np.int32)}, mesh)
  hand = forward_flops_per_image(nets, state.online_params, state.online_state, size)
  # The same shape arithmetic over the whole traced update step (forward, backward, target).
  step_jaxpr_flops = jaxpr_matmul_flops(jax.make_jaxpr(update)(state, batch).jaxpr)

  # Evaluation forward first: the update step donates (consumes) the state.
  embed = train_step.make_embed_fn(nets, mesh)
  images = batch["view1"]
  start = time.perf_counter()
  embed_compiled = embed.lower(state.online_params, state.online_state, images).compile()
  eval_compile_s = time.perf_counter() - start
  eval_s, eval_cpu_s, _, _ = summarize(time_call(
      embed_compiled, (state.online_params, state.online_state, images), args.seconds / 2,
      args.repeats))
  eval_flops = xla_flops(embed_compiled) * mesh.devices.size

  start = time.perf_counter()
  compiled = update.lower(state, batch).compile()
  train_compile_s = time.perf_counter() - start
  windows, state = time_update(compiled, state, batch, args.seconds, args.repeats)
  step_s, step_cpu_s, fastest_s, slowest_s = summarize(windows)
  step_flops = xla_flops(compiled) * mesh.devices.size  # cost analysis is per device

  # Measured after the step too and the better kept: on a shared machine one
  # window can be slowed by other processes.
  peak, peak_per_cpu_s = (max(a, b) for a, b in zip(
      peak_before, matmul_peak(jnp.dtype(config.compute_dtype), args.peak_seconds)))
  devices = mesh.devices.size
  fwd = hand["online_forward_gflop_per_image"] * 1e9
  figures = {
      "config": args.config, "batch_size": b, "image_size": size,
      "base_channels": int(config.model.base_channels), "depth": int(config.model.depth),
      "devices": devices, "host_devices": len(jax.devices()),
      "compute_dtype": config.compute_dtype, "merge_views_bn": args.merge_views_bn,
      "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
      "load_average_1min_start": load_before[0],
      "train_compile_s": train_compile_s,
      "timing_windows": args.repeats,
      "train_step_s": step_s,
      "train_images_per_s": b / step_s,
      "train_images_per_s_slowest_window": b / slowest_s,
      "train_images_per_s_fastest_window": b / fastest_s,
      # CPU time of this process: less sensitive than wall time to other processes.
      "train_cpu_s_per_step": step_cpu_s,
      "train_images_per_cpu_s": b / step_cpu_s,
      "train_step_gflop_xla": step_flops / 1e9,
      "train_gflop_per_image_xla": step_flops / b / 1e9,
      "train_step_gflop_jaxpr": step_jaxpr_flops / 1e9,
      # < 1: XLA skips work the shapes imply (taps on padding); > 1: it adds some (recompute).
      "train_xla_over_jaxpr": step_flops / step_jaxpr_flops if step_jaxpr_flops else float("nan"),
      **hand,
      # ~8: online fwd+bwd (3x) on 2 views + target fwd on 2 views, plus augmentation etc.
      "train_flops_over_8x_forward": step_flops / (8 * b * fwd) if fwd else float("nan"),
      "train_achieved_gflop_per_s": step_flops / step_s / 1e9,
      "eval_compile_s": eval_compile_s,
      "eval_images_per_s": b / eval_s,
      "eval_images_per_cpu_s": b / eval_cpu_s,
      "eval_gflop_per_image_xla": eval_flops / b / 1e9,
      "eval_achieved_gflop_per_s": eval_flops / eval_s / 1e9,
      "matmul_peak_gflop_per_s": peak / 1e9,
      "matmul_peak_gflop_per_cpu_s": peak_per_cpu_s / 1e9,
      "peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      **{f"train_{k}": v for k, v in xla_memory_mib(compiled).items()},
      "load_average_1min_end": os.getloadavg()[0],
  }
  figures["train_fraction_of_matmul_peak"] = figures["train_achieved_gflop_per_s"] / (peak / 1e9)
  figures["eval_fraction_of_matmul_peak"] = figures["eval_achieved_gflop_per_s"] / (peak / 1e9)
  # The same ratio per CPU-second: what fraction of the cores' matmul rate the step gets
  # while it runs, whatever share of the cores other processes took.
  figures["train_fraction_of_matmul_peak_per_cpu_s"] = (step_flops / step_cpu_s) / peak_per_cpu_s
  width = max(map(len, figures))
  for k, v in figures.items():
    print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)
  return figures


if __name__ == "__main__":
  main(sys.argv[1:])
