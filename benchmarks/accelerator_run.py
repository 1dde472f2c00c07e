r"""One prepared run on a machine with an accelerator: step speed, then a short pretraining.

Sized to finish within about 8 minutes on one GPU (experiments/speed.md gives
the exact call, the carried wheels and data, and how to build them):

1. the device, and a bf16 matmul peak measured here (8192^3, random data);
2. the update step, bf16: ResNet-50 at 224 px fed host views (global batch 256
   and the largest that fits, from XLA's memory analysis of the first), and
   ResNet-18 at 32 px on in-memory arrays cropped on the device (batch 512 and
   1024). For each: compile time, images/s, XLA's FLOPs of the step, MFU
   against the matmul peak, XLA's memory for the step and the device's peak
   memory so far, and the augmentation's share of the step (the crop and colour
   ops jitted alone, over the step time);
3. BYOL pretraining of a ResNet-18 on the carried CIFAR-10 .npz, TF-free
   (in-memory path, device-side augmentation), for what is left of the budget
   (at most --pretrain_s), then kNN top-1 on its test split against the same
   network at its random initialisation;
4. on a GPU of preflight/gpu.py's table, if 3 minutes are left: the pre-flight's
   prediction for the first case (`--job=compile` for this GPU, deviceless, in a
   subprocess) beside what step 2 measured: memory, step time, images/s;
5. if a minute is left: `bench_ops.py` on this device (ResNet-50's 1x1 convs as
   XLA convolutions vs as matmuls, the stem max-pool two ways), which checks
   the choices `model/resnet.py` made from CPU measurements.

Everything goes to $OUT/accelerator_run.json (rewritten after every stage, so a
late failure keeps the earlier figures; a failed stage is recorded and the
rest still run). Needs jax, dm-haiku, ml_collections, optax, chex; never
TensorFlow. --tiny shrinks every size for a CPU smoke test (tests/test_benchmarks.py).

  python benchmarks/accelerator_run.py --data=.gpu_carry/cifar10_subset.npz
  python benchmarks/accelerator_run.py --tiny --data=/tmp/tiny.npz --out=/tmp/acc
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

# Step cases: (name, config, image size, global batch, input); batch None = the largest
# that fits, planned from the case before it.
CASES = (("resnet50_224_b256", "resnet50_imagenet", 224, 256, "views"),
         ("resnet50_224_largest", "resnet50_imagenet", 224, None, "views"),
         ("resnet18_32_b512", "resnet18_cifar10", 32, 512, "arrays"),
         ("resnet18_32_b1024", "resnet18_cifar10", 32, 1024, "arrays"))
PRETRAIN_BATCH = 512
# --tiny: one case, the pretraining's own config, so its compiled step is reused
# there (a CPU compile costs ~15 s); the largest batch is planned, not run.
TINY_STEPS = 6
MEMORY_HEADROOM = 0.85  # of the free device memory a "largest" batch may plan to use
OPS_ARGS = ("--batch_size=128", "--repeats=10")  # ResNet-50 at 224 px
OPS_ARGS_TINY = ("--image_size=32", "--base_channels=4", "--batch_size=2", "--repeats=1")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=os.path.join(REPO, ".gpu_carry", "cifar10_subset.npz"),
                      help="uint8 CIFAR-10 .npz (train_/test_ images and labels)")
  parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "runs",
                                                                          "accelerator_run")),
                      help="folder for accelerator_run.json (default: $OUT)")
  parser.add_argument("--budget_s", type=float, default=470.0,
                      help="wall-clock budget of the whole run; the pretraining gets the rest")
  parser.add_argument("--pretrain_s", type=float, default=240.0,
                      help="most seconds of pretraining")
  parser.add_argument("--pretrain_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of the pretraining (bf16 BatchNorm gave NaN losses "
                      "on CPU at batch 8: its variance is E[x^2] - E[x]^2 in bf16)")
  parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes")
  return parser.parse_args(argv)


def check_imports():
  missing = []
  for module in ("haiku", "ml_collections", "optax", "chex"):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise SystemExit(f"Missing Python packages: {', '.join(missing)}. Carry their wheels "
                     "(benchmarks/make_gpu_carry.py) and install them first; "
                     "experiments/speed.md has the command.")


class Report:
  """The run's figures, printed as they come and written to JSON after every stage."""

  def __init__(self, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "accelerator_run.json")
    self.data = {"stages": {}, "errors": {}}

  def stage(self, name: str, figures: dict) -> None:
    self.data["stages"][name] = figures
    print(f"[{name}] " + " ".join(f"{k}={_fmt(v)}" for k, v in figures.items()), flush=True)
    self.save()

  def error(self, name: str, error: BaseException) -> None:
    self.data["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
    print(f"[{name}] FAILED: {traceback.format_exc()}", flush=True)
    self.save()

  def save(self) -> None:
    with open(self.path, "w") as f:
      json.dump(self.data, f, indent=2)


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------
# Step measurements.
# ----------------------------------------------------------------------------

def case_config(name: str, size: int, batch: int):
  """A finalised bf16 config for one step case (10 classes; schedules do not matter)."""
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(name)
  config.batch_size = batch
  config.data.image_size = size
  config.compute_dtype = "bfloat16"
  config.steps, config.warmup_steps = 1000, 10
  return config_lib.finalize(config, num_train_examples=50_000, num_classes=10)


_BUILT = {}  # config JSON -> (nets, init, update): equal configs share compiled functions


def build(config, mesh):
  """(nets, a fresh initial state, jitted update) of a config."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from byol_jax.model import networks
  from byol_jax.train import optim, parallel, train_step
  from byol_jax.views import device_augment
  key = config.to_json()
  if key not in _BUILT:
    nets = networks.make_networks(config.model, config.data.num_classes)
    optimizer = optim.make_optimizer(config)
    size = config.data.image_size
    init = jax.jit(lambda: train_step.init_state(config, nets, optimizer, (size, size, 3),
                                                 config.seed),
                   out_shardings=parallel.replicated(mesh))
    update = train_step.make_update_fn(config, nets, optimizer, mesh,
                                       device_augment.make_augment_fn(config))
    _BUILT[key] = (nets, init, update)
  nets, init, update = _BUILT[key]
  return nets, init(), update


def device_memory() -> dict:
  stats = _device().memory_stats() or {}
  return {k: stats[k] for k in ("bytes_limit", "peak_bytes_in_use", "bytes_in_use") if k in stats}


def _device():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0]


def measure_step(config, mesh, input_kind: str, peak_flops: float, seconds: float,
                 source_size=None) -> dict:
  """Compiles and times one update step (raw images of `source_size` px with
  input "arrays"); returns its figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import bench_step  # pylint: disable=g-import-not-at-top
  from byol_jax.views import device_augment  # pylint: disable=g-import-not-at-top
  size, b = config.data.image_size, config.batch_size
  _, state, update = build(config, mesh)
  batch = bench_step.synthetic_batch(config, mesh, input_kind, source_size)
  start = time.perf_counter()
  update(state, batch)  # compiles (and caches) the step; its time is dominated by the compile
  compile_s = time.perf_counter() - start
  _, state, _ = build(config, mesh)  # the call above consumed (donated) the state
  compiled = update.lower(state, batch).compile()  # the cached executable: for its analyses
  flops = bench_step.xla_flops(compiled) * mesh.devices.size
  memory = bench_step.xla_memory_mib(compiled)
  windows, state = bench_step.time_update(update, state, batch, seconds, repeats=3)
  step_s = bench_step.summarize(windows)[0]
  augment = device_augment.make_augment_fn(config)
  crop, color = bench_step.augment_timers(config, mesh, augment)
  crop_s = (bench_step.summarize(bench_step.time_call(crop, (batch,), seconds / 4, 3))[0]
            if input_kind == "arrays" else 0.0)
  color_s = bench_step.summarize(bench_step.time_call(
      color, (crop(batch), jax.random.PRNGKey(0)), seconds / 4, 3))[0]
  figures = dict(
      batch_size=b, image_size=size, depth=int(config.model.depth), input=input_kind,
      compile_s=compile_s, step_s=step_s, images_per_s=b / step_s,
      step_tflop_xla=flops / 1e12, achieved_tflop_per_s=flops / step_s / 1e12,
      mfu=flops / step_s / peak_flops, augment_crop_s=crop_s, augment_color_s=color_s,
      augment_share_of_step=(crop_s + color_s) / step_s,
      **{f"step_{k}": v for k, v in memory.items()})
  figures.update({f"device_{k}_gib": v / 2**30 for k, v in device_memory().items()})
  return figures


def largest_batch(measured: dict) -> int:
  """The batch that should fill the device, from XLA's memory for a measured batch:
  arguments and outputs (parameters, optimiser state, the batch) are taken as
  fixed, temporaries as proportional to the batch. A multiple of 64."""
  b = measured["batch_size"]
  if "device_bytes_limit_gib" not in measured:  # no memory figures (CPU): just double
    return 2 * b
  fixed = (measured.get("step_xla_argument_mib", 0) + measured.get("step_xla_output_mib", 0))
  per_example = measured.get("step_xla_temp_mib", 0) / b
  free = measured["device_bytes_limit_gib"] * 1024 * MEMORY_HEADROOM - fixed
  return max(64, int(free / max(per_example, 1e-6)) // 64 * 64)


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ----------------------------------------------------------------------------
# Pretraining on the carried CIFAR-10.
# ----------------------------------------------------------------------------

def pretrain_config(data: str, steps: int, tiny: bool, dtype: str = "float32"):
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  from byol_jax.data import datasets
  config = config_lib.load("demo" if tiny else "resnet18_cifar10")
  config.data.update(dict(source="npz", path=data, train_split="train", test_split="test",
                          val_split="test"))
  config.compute_dtype = dtype
  config.batch_size = 8 if tiny else PRETRAIN_BATCH
  if tiny:
    config.model.update(dict(base_channels=4, projector_hidden=32, predictor_hidden=32,
                             projection_dim=16))
    config.data.image_size = 16
    config.eval.batch_size = 32
  config.steps = steps
  config.warmup_steps = max(1, steps // 20)  # 5%: a short run needs a short warm-up
  num_examples, num_classes = datasets.dataset_info(config, "train")
  return config_lib.finalize(config, num_examples, num_classes)


def knn(config, embed, state, mesh) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluate import evaluation
  kwargs = dict(batch_size=config.eval.batch_size, process_index=jax.process_index(),
                process_count=jax.process_count())
  return evaluation.evaluate(
      embed, state.online_params, state.online_state,
      train_batches=input_pipeline.eval_batches(config, "train", **kwargs),
      test_batches=input_pipeline.eval_batches(config, "test", **kwargs), mesh=mesh,
      num_classes=config.data.num_classes, knn_k=config.eval.knn_k,
      knn_temperature=config.eval.knn_temperature)


def pretrain(args, mesh, step_s: float, seconds: float) -> dict:
  """Pretrains for about `seconds` (its step count planned from `step_s`); kNN before/after."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel, train_step
  # The step cases run in bf16; a float32 step is assumed twice as slow.
  slowdown = 2.0 if args.pretrain_dtype == "float32" else 1.0
  steps = TINY_STEPS if args.tiny else max(50, int(seconds / (step_s * slowdown)))
  config = pretrain_config(args.data, steps, args.tiny, args.pretrain_dtype)
  nets, state, update = build(config, mesh)
  embed = train_step.make_embed_fn(nets, mesh)
  start = time.perf_counter()
  before = knn(config, embed, state, mesh)
  eval_s = time.perf_counter() - start
  batches = input_pipeline.pretrain_batches(config, start_step=0, process_index=0,
                                            process_count=1)
  losses, log_every = [], max(1, steps // 20)
  start = time.perf_counter()
  done = 0
  for step in range(steps):
    if time.perf_counter() - start > 1.5 * seconds:  # the plan was off: keep the budget
      break
    state, metrics = update(state, parallel.to_global(next(batches), mesh))
    done = step + 1
    if step == 0:
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - start  # includes the compile
    if done % log_every == 0 or done == steps:
      m = parallel.fetch(metrics)
      losses.append((step + 1, float(m["byol_loss"])))
      if not np.isfinite(m["byol_loss"]):
        raise FloatingPointError(f"byol_loss became {m['byol_loss']} at step {step + 1}")
  jax.block_until_ready(state)
  train_s = time.perf_counter() - start
  after = knn(config, embed, state, mesh)
  return dict(
      steps=done, planned_steps=steps, batch_size=config.batch_size,
      compute_dtype=config.compute_dtype,
      epochs=done * config.batch_size / config.data.num_train_examples,
      num_train_examples=config.data.num_train_examples, train_s=train_s,
      first_step_s=first_step_s,
      images_per_s=(done - 1) * config.batch_size / max(train_s - first_step_s, 1e-9),
      eval_s=eval_s, byol_loss_first=losses[0][1], byol_loss_last=losses[-1][1],
      knn_top1_random_init=before["eval/knn_top1"], knn_top1_pretrained=after["eval/knn_top1"],
      probe_top1_pretrained=after.get("eval/probe_top1", float("nan")),
      projection_std_pretrained=after["eval/projection_std"], loss_curve=losses)


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------

def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  deadline = start + args.budget_s
  # The largest-batch case plans from the device's memory: let JAX take most of it.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  check_imports()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import bench_step  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel  # pylint: disable=g-import-not-at-top
  report = Report(args.out)
  mesh = parallel.make_mesh(jax.devices()[:1])
  report.stage("device", dict(
      device_kind=_device().device_kind, platform=_device().platform,
      device_count=jax.device_count(), jax=jax.__version__, python=platform.python_version(),
      tensorflow_loaded="tensorflow" in sys.modules and sys.modules["tensorflow"] is not None,
      **{f"{k}_gib": v / 2**30 for k, v in device_memory().items()}))

  n = 256 if args.tiny else 8192
  peak, _ = bench_step.matmul_peak(jnp.bfloat16, 0.2 if args.tiny else 3.0, n)
  report.stage("bf16_matmul_peak", dict(n=n, tflop_per_s=peak / 1e12))

  measured = run_cases(args, mesh, peak, report)
  arrays_case = [v for k, v in measured.items() if v["input"] == "arrays"]
  step_s = (min(v["step_s"] * PRETRAIN_BATCH / v["batch_size"] for v in arrays_case)
            if arrays_case else 0.05)
  budget = min(args.pretrain_s, deadline - time.perf_counter() - 40.0)  # 40 s: compile, kNN
  try:
    report.stage("pretrain_resnet18_cifar10", pretrain(args, mesh, step_s, max(budget, 30.0)))
  except Exception as e:  # pylint: disable=broad-except
    report.error("pretrain_resnet18_cifar10", e)
  first = measured.get(CASES[0][0])
  if first and deadline - time.perf_counter() > 180.0:
    try:
      report.stage("preflight_vs_measured", preflight_check(first, args.out))
    except Exception as e:  # pylint: disable=broad-except
      report.error("preflight_vs_measured", e)
  if deadline - time.perf_counter() > 60.0:
    import bench_ops  # pylint: disable=g-import-not-at-top
    try:
      report.stage("ops", bench_ops.main(list(OPS_ARGS_TINY if args.tiny else OPS_ARGS)))
    except Exception as e:  # pylint: disable=broad-except
      report.error("ops", e)
  report.data["total_s"] = time.perf_counter() - start
  report.save()
  print(f"wrote {report.path} after {report.data['total_s']:.0f} s", flush=True)
  _print_table(report.data)
  return 1 if report.data["errors"] else 0


def preflight_check(measured: dict, out_dir: str) -> dict:
  """The deviceless compile of the first case for this GPU (what `--job=compile` predicts
  on a CPU host) beside what was measured here."""
  from byol_jax.preflight import gpu  # pylint: disable=g-import-not-at-top
  name = gpu.by_device_kind(_device().device_kind)
  if name is None:
    return {"skipped": f"{_device().device_kind} is not in preflight/gpu.py's table"}
  workdir = os.path.join(out_dir, "preflight")
  cmd = [sys.executable, "-m", "byol_jax.main", "--job=compile", f"--config={CASES[0][1]}",
         f"--config.compile.topology={name}", "--config.compile.steps=('pretrain',)",
         f"--config.batch_size={measured['batch_size']}", "--config.compute_dtype=bfloat16",
         f"--config.data.image_size={measured['image_size']}", "--config.data.num_classes=10",
         "--config.data.num_train_examples=50000", "--config.augment.crop_on=host",  # as measured
         f"--workdir={workdir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"the pre-flight compile failed: {result.stderr[-2000:]}")
  with open(os.path.join(workdir, "compile_report.json")) as f:
    step = json.load(f)["steps"]["pretrain"]
  measured_gib = sum(measured.get(f"step_xla_{k}_mib", 0)
                     for k in ("argument", "output", "temp")) / 1024
  predicted_s = step["roofline"]["step_s"]
  return dict(
      command=" ".join(cmd[1:]), gpu=name,
      predicted_memory_gib_lower_bound=step["memory_needed_lower_bound"] / 2**30,
      measured_xla_memory_gib=measured_gib,
      measured_device_peak_gib=measured.get("device_peak_bytes_in_use_gib"),
      predicted_tflop=step["flops"] / 1e12, measured_xla_tflop=measured["step_tflop_xla"],
      predicted_roofline_step_s=predicted_s, measured_step_s=measured["step_s"],
      measured_over_roofline_step=measured["step_s"] / predicted_s,
      predicted_roofline_images_per_s=step["roofline"]["images_per_s_per_chip"],
      measured_images_per_s=measured["images_per_s"])


def run_cases(args, mesh, peak: float, report: Report) -> dict:
  """Measures every step case; a failed case is recorded and the others still run."""
  if args.tiny:
    from byol_jax.data import datasets  # pylint: disable=g-import-not-at-top
    config = pretrain_config(args.data, TINY_STEPS, True, args.pretrain_dtype)
    side = datasets.load_source(config, "train").images.shape[1]  # as the pretraining's
    figures = measure_step(config, mesh, "arrays", peak, 0.05, source_size=side)
    report.stage("tiny_arrays_b8", figures)
    report.stage("tiny_largest_planned", dict(batch_size=largest_batch(figures)))
    return {"tiny_arrays_b8": figures}
  measured = {}
  for name, config_name, size, batch, input_kind in CASES:
    if batch is None:
      previous = measured.get(name.replace("largest", "b256"))
      if previous is None:
        continue
      batch = largest_batch(previous)
    for attempt in range(3):  # a planned largest batch may still not fit: back off
      try:
        config = case_config(config_name, size, batch)
        measured[name] = measure_step(config, mesh, input_kind, peak, 2.0)
        report.stage(name, measured[name])
        break
      except Exception as e:  # pylint: disable=broad-except  # recorded, the run goes on
        if is_out_of_memory(e) and attempt < 2:
          print(f"[{name}] batch {batch} does not fit; trying {batch * 3 // 4 // 64 * 64}",
                flush=True)
          batch = max(64, batch * 3 // 4 // 64 * 64)
          continue
        report.error(name, e)
        break
      finally:
        _BUILT.clear()  # free the case's executables and buffers before the next
        gc.collect()
  return measured


def _print_table(data: dict) -> None:
  print(f"{'case':<22} {'batch':>6} {'compile s':>9} {'img/s':>9} {'TFLOP/step':>10} "
        f"{'MFU':>6} {'aug share':>9} {'step GiB':>8}")
  for name, f in data["stages"].items():
    if "step_s" in f:
      gib = sum(f.get(f"step_xla_{k}_mib", 0) for k in ("argument", "output", "temp")) / 1024
      print(f"{name:<22} {f['batch_size']:>6} {f['compile_s']:>9.1f} {f['images_per_s']:>9.0f} "
            f"{f['step_tflop_xla']:>10.3f} {f['mfu']:>6.3f} {f['augment_share_of_step']:>9.3f} "
            f"{gib:>8.2f}")
  p = data["stages"].get("pretrain_resnet18_cifar10")
  if p:
    print(f"pretrain: {p['steps']} steps ({p['epochs']:.1f} epochs) in {p['train_s']:.0f} s; "
          f"kNN top-1 {p['knn_top1_random_init']:.4f} at init -> {p['knn_top1_pretrained']:.4f}")
  for name, error in data["errors"].items():
    print(f"FAILED {name}: {error[:300]}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
