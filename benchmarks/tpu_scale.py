r"""The rows of experiments/tpu_scale.md: the steps compiled for Cloud TPU slices, from a CPU host.

Each row runs `python -m byol_jax.main --job=compile` (the pre-flight a user runs, with
the command printed) into --out/ROW/ and reads its compile_report.json: per-device
memory against the chip's HBM, FLOPs and bytes per step, all-reduce bytes and the
roofline ESTIMATE (byol_jax/preflight/roofline.py). `--calibrate` instead compiles a
supervised ResNet-50 step (byol_jax's encoder and a linear head, SGD with Nesterov
momentum, bf16, global batch 1024: the flax ImageNet example's setting) for a v3-8 and
puts its roofline beside the flax example's published speed on a v3-8: how far to trust
the estimate. `--supervised=v4-8:512` compiles that same supervised step for any slice
and batch: the yardstick a BYOL row is read against on its own chip.

Needs libtpu (`pip install -e ".[tpu]"`); no TPU. A ResNet-50 compile takes ~3 CPU
minutes and ~10 GB of host memory, so rows run one after another.

  python benchmarks/tpu_scale.py --rows=r50_bf16_v4 --out=runs/tpu_scale
  python benchmarks/tpu_scale.py --rows=all --out=runs/tpu_scale   # the whole table
  python benchmarks/tpu_scale.py --calibrate --out=runs/tpu_scale
  python benchmarks/tpu_scale.py --supervised=v4-8:512,v5p-8:512 --out=runs/tpu_scale
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (config, topology, slices, overrides). Rows compile what --job=pretrain runs (the
# update step and the evaluation forward); r50_bf16_v4 the linear-eval step too.
PRETRAIN = ("--config.compile.steps=('pretrain', 'eval')",)
BF16 = ("--config.compute_dtype=bfloat16",)
ROWS = {
    "r50_bf16_v4": ("resnet50_imagenet", "v4-128", 1, BF16),
    "r50_f32_v4": ("resnet50_imagenet", "v4-128", 1, ()),
    "r50_bf16_merged_v4": ("resnet50_imagenet", "v4-128", 1,
                           BF16 + ("--config.model.merge_views_bn=True",)),
    "r50_bf16_v5p": ("resnet50_imagenet", "v5p-128", 1, BF16),
    "r50_bf16_v5e": ("resnet50_imagenet", "v5litepod-256", 1, BF16),
    "r50_bf16_v6e": ("resnet50_imagenet", "v6e-64", 1, BF16),
    "r50_bf16_v5p_x2": ("resnet50_imagenet", "v5p-128", 2, BF16),
    "r50_bf16_v3": ("resnet50_imagenet", "v3-512", 1, BF16),  # the reference's 512 v3 cores
    "r50_bf16_v4_64": ("resnet50_imagenet", "v4-64", 1, BF16),  # 128 per chip
    "r50_bf16_v4_32": ("resnet50_imagenet", "v4-32", 1, BF16),  # 256 per chip
    "r50_bf16_v5p_64": ("resnet50_imagenet", "v5p-64", 1, BF16),  # 128 per chip
    "r50_bf16_v5p_32": ("resnet50_imagenet", "v5p-32", 1, BF16),  # 256 per chip
    "r50_bf16_v5p_16": ("resnet50_imagenet", "v5p-16", 1, BF16),  # 512 per chip
    "r200x2_v4": ("resnet200x2_imagenet", "v4-128", 1, ()),  # bf16 is its default
    "r50_gn_ws_v4": ("resnet50_imagenet_gn_ws", "v4-128", 1, BF16),
    "r200x2_noremat_v4": ("resnet200x2_imagenet", "v4-128", 1, ("--config.model.remat=False",)),
    # The frontier of experiments/tpu_scale.md: ResNet-50's update step alone on a v4-8 at 64
    # per chip (as v4-128 at batch 4096), before and after each change.
    "f0_slices_two_pass": ("resnet50_imagenet", "v4-8", 1, BF16 + (
        "--config.batch_size=256", "--config.model.max_pool=slices",
        "--config.model.views_in_one_pass=False")),
    "f1_two_pass": ("resnet50_imagenet", "v4-8", 1, BF16 + (
        "--config.batch_size=256", "--config.model.views_in_one_pass=False")),
    "f2_one_pass": ("resnet50_imagenet", "v4-8", 1, BF16 + ("--config.batch_size=256",)),
    "f3_one_pass_128": ("resnet50_imagenet", "v4-8", 1, BF16 + ("--config.batch_size=512",)),
}


def row_command(name: str, out: str, python: str = sys.executable) -> list:
  config, topology, slices, overrides = ROWS[name]
  steps = () if name == "r50_bf16_v4" else (
      ("--config.compile.steps=('pretrain',)", "--config.compile.save_hlo=True")
      if name.startswith("f") else PRETRAIN)
  return [python, "-m", "byol_jax.main", "--job=compile", f"--config={config}",
          f"--config.compile.topology={topology}", f"--config.compile.num_slices={slices}",
          *steps, *overrides, f"--workdir={os.path.join(out, name)}"]


def run_row(name: str, out: str) -> dict:
  """Runs one row's compile job; its report, command, wall and CPU seconds and load."""
  cmd = row_command(name, out)
  print("$ " + shlex.join(cmd), flush=True)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load, start = os.getloadavg()[0], time.time()
  result = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  sys.stdout.write(result.stdout)
  sys.stderr.write(result.stderr[-2000:])
  row = {"row": name, "command": shlex.join(cmd[1:]).replace(REPO + "/", ""),
         "returncode": result.returncode, "wall_s": time.time() - start,
         "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
         "load_average_start": load, "load_average_end": os.getloadavg()[0],
         "error": result.stderr.strip().splitlines()[-1] if result.returncode else None}
  report = os.path.join(out, name, "compile_report.json")
  if os.path.exists(report):
    with open(report) as f:
      row["report"] = json.load(f)
  return row


def supervised(out: str, topology_name: str = "v3-8", batch: int = 1024,
               max_pool: str = "auto") -> dict:
  """Compiles the supervised step (encoder + linear head fine-tuned with SGD, bf16) for
  `topology_name` at global `batch`; its FLOPs, bytes and roofline, written to
  `out/supervised_<topology>_<batch>.json` with the optimised HLO beside it."""
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  from byol_jax.preflight import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from byol_jax.preflight import roofline, topology  # pylint: disable=g-import-not-at-top
  from byol_jax.train import linear_step, parallel
  import jax  # pylint: disable=g-import-not-at-top

  config = config_lib.load("resnet50_imagenet")
  config.linear_eval.fine_tune = True     # the encoder trains: a supervised step
  config.linear_eval.batch_size = batch
  config.model.max_pool = max_pool
  config = config_lib.finalize(config, roofline.IMAGENET_TRAIN, 1000)
  topo = topology.parse(topology_name)
  mesh = parallel.make_mesh(topology.devices(topo))
  step = compile_lib.build_steps(config, mesh, steps=("linear_eval",))["linear_eval"]
  bf16 = linear_step.make_linear_step(config, mesh, lr=config.linear_eval.base_lr,
                                      weight_decay=1e-4, steps=1000, compute_dtype="bfloat16")
  step = compile_lib.Step(bf16.update, step.args, step.examples)
  os.makedirs(out, exist_ok=True)
  cpu = time.process_time()
  name = f"supervised_{topo.name}_{batch}" + ("" if max_pool == "auto" else f"_{max_pool}")
  row = compile_lib.compile_step("supervised", step, os.path.join(out, f"{name}.hlo.txt"))
  row["cpu_s"] = time.process_time() - cpu
  per_device = step.examples / topo.num_devices
  row["roofline"] = roofline.estimate(row["flops"], row["bytes_accessed"], per_device,
                                      roofline.CHIPS[topo.generation], topo.devices_per_chip)
  row.update(topology=topo.name, batch=batch, examples_per_device=per_device,
             examples_per_chip=per_device * topo.devices_per_chip, max_pool=max_pool,
             jax_version=jax.__version__)
  r = row["roofline"]
  print(f"supervised ResNet-50, bf16, batch {batch} on {topo.name} "
        f"({row['examples_per_chip']:g} per chip): {row['flops'] / 1e12:.3f} TFLOP and "
        f"{row['bytes_accessed'] / 1e9:.1f} GB per device ({r['bytes_per_flop']:.4f} B/FLOP); "
        f"roofline {r['step_s'] * 1e3:.0f} ms ({r['bound']}-bound), "
        f"{r['images_per_s_per_chip']:.0f} images/s per chip, MFU ceiling "
        f"{r['mfu_ceiling']:.0%}", flush=True)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(row, f, indent=2, default=float)
  return row


def calibrate(out: str, max_pool: str = "auto") -> dict:
  """The supervised step's roofline on a v3-8 at batch 1024 (the flax example's setting)
  beside that example's published speed; `max_pool` "slices" compiles the stem pool as it
  was before it became reduce_window on TPU."""
  from byol_jax.preflight import roofline  # pylint: disable=g-import-not-at-top
  row = supervised(out, "v3-8", 1024, max_pool)
  estimate = row["roofline"]["images_per_s_per_chip"]
  published = roofline.FLAX_IMAGES_PER_S_PER_V3_CHIP
  row.update(published_images_per_s_per_chip=published, calibration=published / estimate,
             published_step_s=row["examples_per_chip"] / published)
  print(f"published {published:.0f} images/s per chip ({row['published_step_s'] * 1e3:.0f} "
        f"ms): published / estimate = {row['calibration']:.2f}", flush=True)
  name = "calibration" if max_pool == "auto" else f"calibration_{max_pool}"
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(row, f, indent=2, default=float)
  return row


def table(out: str) -> str:
  """experiments/tpu_scale.md's table: one markdown row per compiled row of rows.jsonl (the
  last run of each, in ROWS' order), read through the calibration of calibration.json."""
  from byol_jax.preflight import roofline  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out, "calibration.json")) as f:
    calibration = json.load(f)["calibration"]
  rows = {}
  with open(os.path.join(out, "rows.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["row"]] = row
  v3_peak = roofline.CHIPS["v3"].bf16_flops
  lines = ["| row | slice | batch per chip | compile (CPU) | HBM per device | TFLOP | GB | B/FLOP "
           "| all-reduce | roofline step | images/s per chip: estimate, x calibration | MFU "
           "ceiling | reference at its MFU on this chip |",
           "|" + "---|" * 13]
  order = list(ROWS)
  for name, row in sorted(rows.items(), key=lambda item: (
      order.index(item[0]) if item[0] in order else len(order))):
    report = row.get("report") or {}
    step = report.get("steps", {}).get("pretrain")
    if row["returncode"] or not step:
      lines.append(f"| {name} | | | {row['cpu_s']:.0f} s | {row['error']} |" + " |" * 8)
      continue
    topo, chip, r = report["topology"], report["chip"], step["roofline"]
    reference = roofline.REFERENCE_IMAGES_PER_S_PER_V3_CHIP * chip["bf16_flops"] / v3_peak
    all_reduce = step["collectives"].get("all-reduce", {}).get("bytes", 0)
    slices = f" x {topo['num_slices']}" if topo["num_slices"] > 1 else ""
    lines.append(
        f"| {name} | {topo['name']}{slices} | {report['batch_size'] / topo['chips']:g} "
        f"| {step['compile_s']:.0f} s ({row['cpu_s']:.0f} s) "
        f"| {step['hbm_needed'] / 2**30:.1f} / {chip['hbm_bytes_per_device'] / 2**30:.1f} GiB "
        f"({step['hbm_fraction']:.0%}) | {step['flops'] / 1e12:.2f} "
        f"| {step['bytes_accessed'] / 1e9:.1f} | {r['bytes_per_flop']:.4f} "
        f"| {all_reduce / 1e6:.0f} MB | {r['step_s'] * 1e3:.1f} ms, {r['bound']} "
        f"| {r['images_per_s_per_chip']:.0f}, {r['images_per_s_per_chip'] * calibration:.0f} "
        f"| {r['mfu_ceiling']:.0%} | {reference:.0f} |")
  return "\n".join(lines)


def yardstick_table(out: str) -> str:
  """The supervised steps of `--supervised` (supervised_*.json in --out), one row each."""
  lines = ["| supervised step | batch per chip | TFLOP | GB | B/FLOP | roofline step | MFU ceiling |",
           "|" + "---|" * 7]
  for name in sorted(os.listdir(out)):
    if not (name.startswith("supervised_") and name.endswith(".json")):
      continue
    with open(os.path.join(out, name)) as f:
      row = json.load(f)
    r = row["roofline"]
    lines.append(f"| {row['topology']}, batch {row['batch']} | {row['examples_per_chip']:g} "
                 f"| {row['flops'] / 1e12:.3f} | {row['bytes_accessed'] / 1e9:.1f} "
                 f"| {r['bytes_per_flop']:.4f} | {r['step_s'] * 1e3:.1f} ms, {r['bound']} "
                 f"| {r['mfu_ceiling']:.0%} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="", help=f"'all' or a comma list of {', '.join(ROWS)}")
  parser.add_argument("--calibrate", action="store_true")
  parser.add_argument("--max_pool", default="auto", choices=("auto", "slices"),
                      help="--calibrate: the stem pool (slices: as before it changed on TPU)")
  parser.add_argument("--supervised", default="",
                      help="Comma list of TOPOLOGY:BATCH (e.g. v4-8:512) to compile the "
                           "supervised step for, the yardstick of the BYOL rows on that chip.")
  parser.add_argument("--table", action="store_true",
                      help="Print the markdown table of what --out holds, then exit.")
  parser.add_argument("--out", default="runs/tpu_scale")
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  if args.table:
    print(table(out) + "\n\n" + yardstick_table(out))
    return 0
  if args.calibrate:
    calibrate(out, args.max_pool)
  for item in filter(None, args.supervised.split(",")):
    topology_name, _, batch = item.partition(":")
    supervised(out, topology_name, int(batch or 1024))
  names = list(ROWS) if args.rows == "all" else [r for r in args.rows.split(",") if r]
  for name in names:
    if name not in ROWS:
      parser.error(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
  os.makedirs(out, exist_ok=True)
  for name in names:
    row = run_row(name, out)
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
      f.write(json.dumps(row, default=float) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
