"""The compile job: a config's steps compiled for a Cloud TPU slice, on any host.

    python -m byol_jax.main --job=compile --config=resnet50_imagenet \\
        --config.compile.topology=v4-128

compiles what `--job=pretrain` runs there (the update step with its device
augmentation, and the evaluation forward) and the `--job=linear_eval` step,
with the TPU compiler (libtpu: `pip install -e ".[tpu]"`), reading no data and
allocating nothing (`preflight/compile.py`). It prints per device, for each step:
memory against the chip's HBM, FLOPs and HBM bytes per step, the all-reduce
bytes, and a roofline ESTIMATE of step time, images/s per chip and the MFU
ceiling (`preflight/roofline.py`), and writes compile_report.json (in --workdir,
else the current directory). A step that does not fit the chip ends the job
with one line: what it needs, what the chip has, what to change.
"""

import json
import math
import os
from typing import Optional

import jax

from byol_jax import config_lib, fileio
from byol_jax.data import datasets
from byol_jax.evaluate import evaluation
from byol_jax.errors import ConfigError
from byol_jax.preflight import compile as compile_lib
from byol_jax.preflight import gpu, roofline, topology
from byol_jax.train import parallel

REPORT = "compile_report.json"
HEADROOM = 0.2  # a step with less free HBM than this is flagged as tight
SMALLEST_SLICE = 4  # chips: the fewest a slice name is suggested with
BATCH_FIELDS = {"pretrain": "batch_size", "eval": "eval.batch_size",
                "linear_eval": "linear_eval.batch_size"}
# Steps that periodic evaluation runs beside the train state: how many of their leading
# arguments are part of it (the forward reads the online network; the kNN none).
RESIDENT = {"eval": 2, "knn": 0}
# Steps over the whole training split's features rather than a batch.
FEATURE_STEPS = ("knn", "probe")
GIB = 2.0**30


def run(config, workdir) -> dict:
  cc = config.compile
  if not cc.topology:
    raise ConfigError(f"Missing --config.compile.topology: the TPU slice to compile for, one of "
                      f"the {topology.FORMS}; or NVIDIA GPUs, one of the {gpu.FORMS}.")
  if gpu.is_gpu(cc.topology):
    from byol_jax.jobs import compile_gpu  # pylint: disable=g-import-not-at-top
    return compile_gpu.run(config, workdir)
  topo = topology.parse(cc.topology, cc.num_slices)
  config, steps = checked_steps(config, lambda: topology.devices(topo))

  chip = roofline.CHIPS[topo.generation]
  hbm = chip.hbm_bytes / topo.devices_per_chip
  report = {"note": "roofline figures are ESTIMATES from the compiled program's cost analysis "
                    "(preflight/roofline.py), not measurements",
            "topology": dict(topo._asdict(), topology_name=topo.topology_name, chips=topo.chips,
                             devices=topo.num_devices),
            "chip": dict(chip._asdict(), hbm_bytes_per_device=hbm),
            "batch_size": config.batch_size, "compute_dtype": config.compute_dtype,
            "model": config.model.to_dict(), "steps": {},
            "reference_images_per_s_per_v3_chip": roofline.REFERENCE_IMAGES_PER_S_PER_V3_CHIP,
            "calibration": roofline.CALIBRATION}
  slices = f" x {topo.num_slices} slices" if topo.num_slices > 1 else ""
  print(f"[compile] {topo.name} = {topo.topology_name}{slices}: {topo.chips} chips, "
        f"{topo.devices_per_chip} device(s) per chip with {chip.hbm_bytes / GIB:.1f} GiB HBM; "
        f"batch {config.batch_size} ({config.batch_size / topo.chips:g} per chip), "
        f"{config.compute_dtype}", flush=True)
  path = os.path.join(workdir or ".", REPORT)
  print(HEADER, flush=True)
  try:
    for name, step in steps.items():
      hlo = os.path.join(workdir or ".", f"{name}.hlo.txt") if cc.save_hlo else None
      row = compile_lib.compile_step(name, step, hlo)
      per_device = step.examples / topo.num_devices
      row["examples_per_device"] = per_device
      row["examples"] = step.examples
      row["roofline"] = roofline.estimate(row["flops"], row["bytes_accessed"], per_device, chip,
                                          topo.devices_per_chip)
      row["roofline"]["calibrated_images_per_s_per_chip"] = (
          row["roofline"]["images_per_s_per_chip"] * roofline.CALIBRATION)
      need = row["memory"]["total"]
      if name in RESIDENT and "pretrain" in steps:  # the train state stays in HBM meanwhile
        need += _nbytes(steps["pretrain"].args[0]) - _nbytes(step.args[:RESIDENT[name]])
      row["hbm_needed"], row["hbm_fraction"] = need, need / hbm
      report["steps"][name] = row
      print(_line(name, row, hbm), flush=True)
  except compile_lib.OutOfMemoryError as e:
    report["error"] = str(e)
    _write(path, report)
    if e.needed is None:
      raise ConfigError(f"The {e.step} step does not fit a {topo.generation} device: "
                        f"{e.message} {_advice(config, topo, e.step, 2.0)}") from None
    raise ConfigError(_does_not_fit(e.step, e.needed, e.available, config, topo)) from None
  over = [(n, r) for n, r in report["steps"].items() if r["hbm_fraction"] > 1.0]
  hint = None if over or "pretrain" not in steps else _denser_slice(
      report["steps"]["pretrain"], config.batch_size, topo)
  if hint:
    report["hint"] = hint
  cost = periodic_eval_cost(config, report["steps"])
  if cost:
    report["periodic_eval"] = cost
  _write(path, report)
  print(f"[compile] roofline = max(FLOPs / bf16 peak, bytes / HBM bandwidth): an estimate, not a "
        f"measurement; calibrated = x{roofline.CALIBRATION} (a supervised ResNet-50 step's "
        f"published v3 speed over its estimate). DeepMind's reference ran "
        f"{roofline.REFERENCE_IMAGES_PER_S_PER_V3_CHIP:.0f} images/s per v3 chip. Report: {path}",
        flush=True)
  if cost:
    print(f"[compile] {cost['line']}", flush=True)
  if hint:
    print(f"[compile] {hint}", flush=True)
  if over:
    name, row = max(over, key=lambda item: item[1]["hbm_fraction"])
    raise ConfigError(_does_not_fit(name, row["hbm_needed"], hbm, config, topo))
  return report


def checked_steps(config, devices):
  """(finalised config, `build_steps`' steps) over the mesh of `devices()`, the step names
  and every batch checked first (ConfigError)."""
  names = tuple(config.compile.steps)
  unknown = sorted(set(names) - set(compile_lib.STEPS))
  if unknown or not names:
    raise ConfigError(f"compile.steps must name some of {', '.join(compile_lib.STEPS)}; got "
                      f"{names}.")
  examples, classes, side = datasets.known_split_info(config, config.data.train_split)
  config = config_lib.finalize(config, examples, classes)
  mesh = parallel.make_mesh(devices())
  steps = compile_lib.build_steps(config, mesh, side, names)
  for name, step in steps.items():
    if name not in FEATURE_STEPS:
      parallel.check_batch_size(step.examples, mesh)
  return config, steps


HEADER = (f"  {'step':<12}{'compile':>8}  {'HBM per device':<24}{'TFLOP':>7}{'GB moved':>10}"
          f"{'B/FLOP':>8}{'all-reduce':>12}   roofline ESTIMATE per step")


def _line(name: str, row: dict, hbm: float) -> str:
  r = row["roofline"]
  tight = " tight" if row["hbm_fraction"] > 1 - HEADROOM else ""
  memory = f"{row['hbm_needed'] / GIB:.2f} / {hbm / GIB:.1f} GiB {row['hbm_fraction']:.0%}{tight}"
  all_reduce = row["collectives"].get("all-reduce", {}).get("bytes", 0)
  rate = (f"per {'chunk of queries' if name == 'knn' else 'step of the fit'}"
          if name in FEATURE_STEPS else
          f"{r['images_per_s_per_chip']:.0f} img/s/chip (calibrated "
          f"{r['calibrated_images_per_s_per_chip']:.0f})")
  return (f"  {name:<12}{row['compile_s']:>6.0f} s  {memory:<24}{row['flops'] / 1e12:>7.3f}"
          f"{row['bytes_accessed'] / 1e9:>10.2f}{r['bytes_per_flop']:>8.4f}"
          f"{all_reduce / 1e6:>9.1f} MB   {r['step_s'] * 1e3:.1f} ms {r['bound']}-bound, "
          f"{rate}, MFU <= {r['mfu_ceiling']:.0%}")


def periodic_eval_cost(config, rows: dict) -> Optional[dict]:
  """Periodic evaluation's device time against the training it interrupts, an ESTIMATE
  from the calibrated roofline: the forwards of the kNN bank and the test split, then
  the kNN's chunks, every eval.every_steps steps. None without the rows or sizes."""
  every = config.eval.every_steps
  if every <= 0 or not all(n in rows for n in ("pretrain", "eval", "knn")):
    return None
  bank_split = evaluation.periodic_train_split(config)
  bank = datasets.known_split_size(config, bank_split)
  test = datasets.known_split_size(config, config.data.test_split)
  if bank is None or test is None:
    return None
  calibrated = lambda name: rows[name]["roofline"]["step_s"] / roofline.CALIBRATION
  batch = config.eval.batch_size
  forwards = (math.ceil(bank / batch) + math.ceil(test / batch)) * calibrated("eval")
  chunks = math.ceil(math.ceil(test / batch) * batch / rows["knn"]["examples"])
  # The "knn" row scores a chunk against the whole training split; the bank may be a slice.
  knn_s = chunks * rows["knn"]["roofline"]["step_s"] * bank / config.data.num_train_examples
  train_s = every * calibrated("pretrain")
  fraction = (forwards + knn_s) / train_s
  line = (f"periodic evaluation (ESTIMATE, device time at the calibrated roofline): "
          f"{bank + test:,} forwards ({bank:,} kNN bank from {bank_split!r} + {test:,} test) "
          f"in {forwards:.1f} s, kNN {chunks} chunks in {knn_s:.2f} s, every {every} steps of "
          f"{train_s:.0f} s: {fraction:.1%} of training time (input reading not counted)")
  return {"bank_examples": bank, "test_examples": test, "forward_s": forwards, "knn_s": knn_s,
          "train_s_between": train_s, "fraction": fraction, "line": line}


def _does_not_fit(step: str, needed: float, available: float, config, topo) -> str:
  """One line: what the step needs, what a device has, what to change."""
  return (f"The {step} step needs {needed / GIB:.2f} GiB of HBM per device; a {topo.generation} "
          f"device has {available / GIB:.2f} GiB. "
          f"{_advice(config, topo, step, needed / available)}")


def _advice(config, topo, step: str, excess: float) -> str:
  """What would fit `excess` times less memory with HEADROOM to spare: a smaller batch per
  chip, bf16, rematerialisation, a bigger slice (for the kNN: a bf16 bank, a smaller one)."""
  shrink = excess / (1 - HEADROOM)
  options = []
  if step in FEATURE_STEPS:
    if step == "knn" and config.eval.knn_bank_dtype != "bfloat16":
      options.append("--config.eval.knn_bank_dtype=bfloat16")
    if step == "knn":
      options.append("a smaller periodic kNN bank (--config.eval.knn_train_split="
                     "'train[:10%]'; --job=knn reads the whole split)")
    fits = 0
  else:
    field = BATCH_FIELDS[step]
    batch = (config.batch_size if field == "batch_size"
             else config[field.split(".")[0]].batch_size)
    per_chip = batch / topo.chips
    fits = 2 ** math.floor(math.log2(per_chip / shrink)) if per_chip / shrink >= 1 else 0
  if fits >= topo.devices_per_chip:
    schedule = "" if step == "eval" else "; the learning rate follows base_lr x batch / 256"
    options.append(f"--config.{field}={fits * topo.chips} ({fits} per chip{schedule})")
  if config.compute_dtype != "bfloat16" and step == "pretrain":
    options.append("--config.compute_dtype=bfloat16")
  if not config.model.remat and step not in ("eval", *FEATURE_STEPS):
    options.append("--config.model.remat=True (recompute activations in the backward pass)")
  chips = topo.chips // topo.num_slices
  bigger = max(SMALLEST_SLICE, 2 ** math.ceil(math.log2(chips * shrink)))
  options.append(f"a bigger slice: --config.compile.topology="
                 f"{topology.cloud_name(topo.generation, bigger)}")
  return "To fit it, use " + ", or ".join(options) + "."


def _denser_slice(row: dict, batch: int, topo) -> Optional[str]:
  """For a memory-bound update step with HBM to spare: the smallest slice that holds the
  same batch with HEADROOM, memory scaled linearly with the batch per chip (an estimate).
  More examples per chip move fewer bytes per FLOP (experiments/tpu_scale.md)."""
  if row["roofline"]["bound"] != "memory" or topo.num_slices > 1:
    return None
  factor = 2 ** math.floor(math.log2((1 - HEADROOM) / row["hbm_fraction"]))
  chips = max(SMALLEST_SLICE, topo.chips // max(factor, 1))
  if chips >= topo.chips or batch % chips:
    return None
  fraction = row["hbm_fraction"] * topo.chips / chips
  return (f"The pretrain step is memory-bound and uses {row['hbm_fraction']:.0%} of HBM. The "
          f"same batch on fewer chips moves fewer bytes per FLOP (a higher MFU ceiling, fewer "
          f"images/s in all): --config.compile.topology="
          f"{topology.cloud_name(topo.generation, chips)} puts {batch // chips} per chip in about "
          f"{fraction:.0%} of HBM (scaled linearly; compile it to check).")


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _write(path: str, report: dict) -> None:
  fileio.write_text(path, json.dumps(report, indent=2, default=float))
