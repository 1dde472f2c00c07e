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
by this process's CPU time (user + system, all threads); --steps=N instead
times N single steps (after one warm-up step), for large nets on small
machines. On a shared machine wall-clock rates move with the other processes;
the CPU-time rates much less. The load average is printed at the start and the
end. Each figure is printed as soon as it is measured.

--input picks what the step is fed: `views` (default), the two host views of
the tf.data path, or `arrays`, raw uint8 images of --source_size px from which
the step itself cuts both views (`device_crop`: the in-memory path). The
augmentation's own time (crop when on the device, and the colour ops, both
views, jitted alone) is printed as `augment_s` and its share of the step;
--no_augment times the step with the augmentation left out entirely.

  python benchmarks/bench_step.py --config=demo --batch_size=64
  python benchmarks/bench_step.py --config=resnet18_cifar10 --batch_size=32
  python benchmarks/bench_step.py --config=demo --merge_views_bn --compute_dtype=bfloat16
  python benchmarks/bench_step.py --config=demo --devices=8   # 8 simulated CPU devices
  python benchmarks/bench_step.py --config=demo --input=arrays --source_size=32
  python benchmarks/bench_step.py --config=resnet50_imagenet --batch_size=16 --steps=2

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
  """(FLOP/s, FLOP per CPU-second) of an n x n matmul: a practical peak for this machine.

  On random data: some chips multiply constant matrices measurably faster.
  """
  import jax  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  count, start, cpu = 0, time.perf_counter(), time.process_time()
  while count < 2 or time.perf_counter() - start < seconds:
    f(a).block_until_ready()
    count += 1
  flops = 2 * n**3 * count
  return flops / (time.perf_counter() - start), flops / (time.process_time() - cpu)


def time_update(compiled, state, batch, min_seconds: float, repeats: int, min_iters: int = 3,
                steps=None):
  """Times the update step in `repeats` windows of >= min_seconds each, or in
  `steps` windows of exactly one step.

  The (donated) state is threaded from step to step; one untimed step first.
  Returns ([(wall s per step, CPU s per step) per window], final state). CPU
  time is this process's user + system time, all threads.
  """
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch)
    return holder[0], metrics

  windows = _time_windows(step, min_seconds, repeats, min_iters, steps)
  return windows, holder[0]


def time_call(fn, args, min_seconds: float, repeats: int, min_iters: int = 3, steps=None):
  """Like time_update, for a function that does not donate its arguments."""
  return _time_windows(lambda: fn(*args), min_seconds, repeats, min_iters, steps)


def _time_windows(call, min_seconds, repeats, min_iters, steps):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(call())
  if steps:  # a bound on the work: `steps` windows of one call each
    min_seconds, repeats, min_iters = 0.0, steps, 1
  windows = []
  for _ in range(repeats):
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while count < min_iters or time.perf_counter() - start < min_seconds:
      out = call()
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
  from byol_jax.model import networks  # pylint: disable=g-import-not-at-top
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
  parser.add_argument("--input", default="views", choices=INPUTS,
                      help="views: host-cut views (tf.data path); arrays: raw images that the "
                      "step crops (in-memory path)")
  parser.add_argument("--source_size", type=int, default=None,
                      help="side of the raw images with --input=arrays (default: image size)")
  parser.add_argument("--no_augment", action="store_true",
                      help="leave the colour ops out of the step (--input=arrays still crops)")
  parser.add_argument("--seconds", type=float, default=5.0,
                      help="minimum length of one timing window")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timing windows per measurement; the median is reported")
  parser.add_argument("--steps", type=int, default=None,
                      help="instead of windows of --seconds: time this many single steps")
  parser.add_argument("--peak_seconds", type=float, default=2.0,
                      help="timing window of the matmul peak")
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  return parser.parse_args(argv)


INPUTS = ("views", "arrays")


class Figures(dict):
  """The figures, each printed as `name  value` the moment it is set."""

  def __setitem__(self, key, value):
    super().__setitem__(key, value)
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{key:<40}  {text}", flush=True)

  def write(self, path) -> dict:
    """Writes the figures as JSON to `path` (if given); returns them as a plain dict."""
    if path:
      with open(path, "w") as f:
        json.dump(dict(self), f, indent=2)
    return dict(self)


def configure(args):
  """The named config with the command line's overrides, finalised for a synthetic run."""
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
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
  return config_lib.finalize(config, num_train_examples=10_000, num_classes=10)


def synthetic_batch(config, mesh, input_kind: str, source_size=None, seed: int = 0):
  """A random global batch as the pipeline would ship it: host views (in the
  host path's dtype) or raw uint8 images with crop seeds."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax.configs import base  # pylint: disable=g-import-not-at-top  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel
  from byol_jax.views import host_augment
  rng = np.random.default_rng(seed)
  b, size = config.batch_size, config.data.image_size
  batch = {"label": rng.integers(0, 10, (b,), np.int32)}
  if input_kind == "arrays":
    side = source_size or size
    batch["image"] = rng.integers(0, 256, (b, side, side, 3), np.uint8)
    batch["crop_seed"] = rng.integers(0, 2**32, (b, 2, 2), np.uint32)
  else:
    dtype = host_augment.VIEW_DTYPES[base.resolve_augment(config.augment)["resize"]]
    for key in ("view1", "view2"):
      view = rng.integers(0, 256, (b, size, size, 3), np.uint8)
      batch[key] = view if dtype == "uint8" else (view / 255.0).astype(dtype)
  return parallel.to_global(batch, mesh)


def make_augment(config, enabled: bool = True):
  """The step's colour-op function, or a plain cast to float [0, 1] when disabled."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol_jax.views import device_augment  # pylint: disable=g-import-not-at-top
  if enabled:
    return device_augment.make_augment_fn(config)

  def cast(images, key, view_index):
    del key, view_index
    if images.dtype == jnp.uint8:
      return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)

  return cast


def augment_timers(config, mesh, augment):
  """Jitted (crop, colour) functions of a batch, as the step runs them, for timing alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from byol_jax.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  data, repl = parallel.batch_sharded(mesh), parallel.replicated(mesh)

  def crop(batch):
    return batch_lib.raw_views(config, batch)

  def color(views, key):
    key1, key2 = jax.random.split(key)
    return augment(views[0], key1, 0), augment(views[1], key2, 1)

  return (jax.jit(crop, in_shardings=(data,), out_shardings=data),
          jax.jit(color, in_shardings=(data, repl), out_shardings=data))


def main(argv=None):
  args = parse_args(argv)
  _set_host_devices(args.host_devices or args.devices)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax.model import networks  # pylint: disable=g-import-not-at-top
  from byol_jax.train import optim, parallel, train_step

  config = configure(args)
  if len(jax.devices()) < args.devices:
    raise SystemExit(f"--devices={args.devices} but only {len(jax.devices())} visible; on a "
                     "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N.")
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  parallel.check_batch_size(config.batch_size, mesh)
  size, b, devices = config.data.image_size, config.batch_size, mesh.devices.size
  timing = dict(min_seconds=args.seconds, repeats=args.repeats, steps=args.steps)
  fig = Figures()
  fig["config"] = args.config
  fig["batch_size"] = b
  fig["image_size"] = size
  fig["input"] = args.input
  fig["augment"] = not args.no_augment
  fig["base_channels"] = int(config.model.base_channels)
  fig["depth"] = int(config.model.depth)
  fig["devices"] = devices
  fig["host_devices"] = len(jax.devices())
  fig["compute_dtype"] = config.compute_dtype
  fig["merge_views_bn"] = args.merge_views_bn
  fig["device_kind"] = jax.devices()[0].device_kind
  fig["cpu_count"] = os.cpu_count()
  fig["load_average_1min_start"] = os.getloadavg()[0]
  dtype = jnp.dtype(config.compute_dtype)
  peak_before = matmul_peak(dtype, args.peak_seconds)
  fig["matmul_peak_start_gflop_per_s"] = peak_before[0] / 1e9

  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = optim.make_optimizer(config)
  state = jax.jit(lambda: train_step.init_state(config, nets, optimizer, (size, size, 3), 0),
                  out_shardings=parallel.replicated(mesh))()
  augment = make_augment(config, not args.no_augment)
  update = train_step.make_update_fn(config, nets, optimizer, mesh, augment)
  batch = synthetic_batch(config, mesh, args.input, args.source_size)
  hand = forward_flops_per_image(nets, state.online_params, state.online_state, size)
  for key, value in hand.items():
    fig[key] = value
  # The same shape arithmetic over the whole traced update step (forward, backward, target).
  step_jaxpr_flops = jaxpr_matmul_flops(jax.make_jaxpr(update)(state, batch).jaxpr)
  fig["train_step_gflop_jaxpr"] = step_jaxpr_flops / 1e9

  # Evaluation forward first: the update step donates (consumes) the state.
  embed = train_step.make_embed_fn(nets, mesh)
  images = parallel.to_global({"image": np.random.default_rng(1).integers(
      0, 256, (b, size, size, 3), np.uint8)}, mesh)["image"]
  start = time.perf_counter()
  embed_compiled = embed.lower(state.online_params, state.online_state, images).compile()
  fig["eval_compile_s"] = time.perf_counter() - start
  eval_s, eval_cpu_s, _, _ = summarize(time_call(
      embed_compiled, (state.online_params, state.online_state, images),
      min_seconds=args.seconds / 2, repeats=args.repeats, steps=args.steps))
  eval_flops = xla_flops(embed_compiled) * devices
  fig["eval_images_per_s"] = b / eval_s
  fig["eval_images_per_cpu_s"] = b / eval_cpu_s
  fig["eval_gflop_per_image_xla"] = eval_flops / b / 1e9
  fig["eval_achieved_gflop_per_s"] = eval_flops / eval_s / 1e9

  start = time.perf_counter()
  compiled = update.lower(state, batch).compile()
  fig["train_compile_s"] = time.perf_counter() - start
  step_flops = xla_flops(compiled) * devices  # cost analysis is per device
  fig["train_step_gflop_xla"] = step_flops / 1e9
  fig["train_gflop_per_image_xla"] = step_flops / b / 1e9
  # < 1: XLA skips work the shapes imply (taps on padding); > 1: it adds some (recompute).
  fig["train_xla_over_jaxpr"] = (step_flops / step_jaxpr_flops if step_jaxpr_flops
                                 else float("nan"))
  fwd = hand["online_forward_gflop_per_image"] * 1e9
  # ~8: online fwd+bwd (3x) on 2 views + target fwd on 2 views, plus augmentation etc.
  fig["train_flops_over_8x_forward"] = step_flops / (8 * b * fwd) if fwd else float("nan")
  for key, value in xla_memory_mib(compiled).items():
    fig[f"train_{key}"] = value
  fig["timing_windows"] = args.steps or args.repeats
  windows, state = time_update(compiled, state, batch, **timing)
  step_s, step_cpu_s, fastest_s, slowest_s = summarize(windows)
  fig["train_step_s"] = step_s
  fig["train_images_per_s"] = b / step_s
  fig["train_images_per_s_slowest_window"] = b / slowest_s
  fig["train_images_per_s_fastest_window"] = b / fastest_s
  # CPU time of this process: less sensitive than wall time to other processes.
  fig["train_cpu_s_per_step"] = step_cpu_s
  fig["train_images_per_cpu_s"] = b / step_cpu_s
  fig["train_achieved_gflop_per_s"] = step_flops / step_s / 1e9

  # The augmentation alone, jitted as the step runs it: the crop (on the device
  # only with --input=arrays) and the colour ops of both views.
  crop, color = augment_timers(config, mesh, augment)
  crop_s = summarize(time_call(crop, (batch,), **timing))[0] if args.input == "arrays" else 0.0
  views = crop(batch)
  color_s = summarize(time_call(color, (views, jax.random.PRNGKey(0)), **timing))[0]
  fig["augment_crop_s"] = crop_s
  fig["augment_color_s"] = color_s
  fig["augment_s"] = crop_s + color_s
  fig["augment_share_of_step"] = (crop_s + color_s) / step_s

  # Measured after the step too and the better kept: on a shared machine one
  # window can be slowed by other processes.
  peak, peak_per_cpu_s = (max(x, y) for x, y in zip(peak_before,
                                                    matmul_peak(dtype, args.peak_seconds)))
  fig["matmul_peak_gflop_per_s"] = peak / 1e9
  fig["matmul_peak_gflop_per_cpu_s"] = peak_per_cpu_s / 1e9
  fig["train_fraction_of_matmul_peak"] = fig["train_achieved_gflop_per_s"] / (peak / 1e9)
  fig["eval_fraction_of_matmul_peak"] = fig["eval_achieved_gflop_per_s"] / (peak / 1e9)
  # The same ratio per CPU-second: what fraction of the cores' matmul rate the step gets
  # while it runs, whatever share of the cores other processes took.
  fig["train_fraction_of_matmul_peak_per_cpu_s"] = (step_flops / step_cpu_s) / peak_per_cpu_s
  fig["peak_host_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  fig["load_average_1min_end"] = os.getloadavg()[0]
  return fig.write(args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
