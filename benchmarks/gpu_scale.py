r"""The rows of experiments/gpu_scale.md: the pretrain step compiled for NVIDIA GPUs, from a
CPU host.

Each row runs `python -m byol_jax.main --job=compile` for a GPU topology (the pre-flight a
user runs; the command is recorded) into --out/ROW/ and appends its report's figures to
--out/rows.jsonl: memory per GPU (a lower bound), FLOPs with the cuDNN convolutions,
bytes, all-reduce bytes, the cuDNN/cuBLAS/Triton calls, the largest batch per GPU with
10% to spare and the roofline ESTIMATE. Rows already in rows.jsonl are skipped (rerun
with --force). `--table` prints the markdown table of rows.jsonl.

Needs JAX's CUDA plugin (`make test-gpu-compile` makes a venv with it: run this with
that venv's python); no GPU. A ResNet-50 compile takes 2-4 CPU minutes.

  .venv-cuda/bin/python benchmarks/gpu_scale.py --rows=r50_bf16_h100 --out=runs/gpu_scale
  .venv-cuda/bin/python benchmarks/gpu_scale.py --table --out=runs/gpu_scale
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config, topology, overrides). Batch 256 per GPU unless the row says otherwise.
BF16 = ("--config.compute_dtype=bfloat16",)
B256 = ("--config.batch_size=256",)
TRITON_OFF = "--xla_gpu_enable_triton_gemm=false"
ROWS = {
    "r50_bf16_h100": ("resnet50_imagenet", "h100", BF16 + B256),
    "r50_f32_h100": ("resnet50_imagenet", "h100", B256),
    "r50_bf16_a100_40": ("resnet50_imagenet", "a100-40gb", BF16 + B256),
    "r50_bf16_a100_80": ("resnet50_imagenet", "a100-80gb", BF16 + B256),
    "r50_bf16_h200": ("resnet50_imagenet", "h200", BF16 + B256),
    "r50_bf16_h100x8": ("resnet50_imagenet", "h100x8", BF16 + ("--config.batch_size=2048",)),
    "r200x2_h100": ("resnet200x2_imagenet", "h100", ("--config.batch_size=64",)),
    "r200x2_h100_cublas": ("resnet200x2_imagenet", "h100", ("--config.batch_size=64",)),
    "r50_gn_ws_h100": ("resnet50_imagenet_gn_ws", "h100", BF16 + B256),
    "r50_gn_ws_h100_cublas": ("resnet50_imagenet_gn_ws", "h100", BF16 + B256),
    # Rows *_cublas send the GEMMs to cuBLAS (XLA_FLAGS below): XLA's Triton GEMM fusion
    # aborts on GN+WS, ResNet-200 and two passes (jax 0.10.2); both layouts compared that way.
    "r50_bf16_h100_two_pass_cublas": ("resnet50_imagenet", "h100", BF16 + B256 + (
        "--config.model.views_in_one_pass=False",)),
    "r50_bf16_h100_one_pass_cublas": ("resnet50_imagenet", "h100", BF16 + B256 + (
        "--config.model.views_in_one_pass=True",)),
}
# The rest of the matrix (issue #30 item 4): f32, ResNet-200 2x and GN+WS on the other GPUs
# and an 8-GPU node, at the same per-GPU batch as their H100 rows.
OTHER_GPUS = {"a100_40": ("a100-40gb", 1), "a100_80": ("a100-80gb", 1), "h200": ("h200", 1),
              "h100x8": ("h100x8", 8)}
for _suffix, (_topology, _gpus) in OTHER_GPUS.items():
  ROWS[f"r50_f32_{_suffix}"] = ("resnet50_imagenet", _topology,
                                (f"--config.batch_size={256 * _gpus}",))
  ROWS[f"r200x2_{_suffix}_cublas"] = ("resnet200x2_imagenet", _topology,
                                      (f"--config.batch_size={64 * _gpus}",))
  ROWS[f"r50_gn_ws_{_suffix}_cublas"] = ("resnet50_imagenet_gn_ws", _topology,
                                         BF16 + (f"--config.batch_size={256 * _gpus}",))
# f32 on the A100s: XLA's Triton GEMMs fail there ("Couldn't find output tile sizes", jax 0.10.2).
for _suffix in ("a100_40", "a100_80"):
  ROWS[f"r50_f32_{_suffix}_cublas"] = ROWS[f"r50_f32_{_suffix}"]
XLA_FLAGS = {name: TRITON_OFF for name in ROWS if name.endswith("_cublas")}


def row_command(name: str, out: str) -> list:
  config, topology, overrides = ROWS[name]
  return [sys.executable, "-m", "byol_jax.main", "--job=compile", f"--config={config}",
          f"--config.compile.topology={topology}", "--config.compile.steps=('pretrain',)",
          *overrides, f"--workdir={os.path.join(out, name)}"]


def run_row(name: str, out: str) -> dict:
  cmd = row_command(name, out)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  if name in XLA_FLAGS:
    env["XLA_FLAGS"] = XLA_FLAGS[name]
  shown = ((f"XLA_FLAGS={XLA_FLAGS[name]} " if name in XLA_FLAGS else "") +
           "JAX_PLATFORMS=cpu python " + shlex.join(cmd[1:]))
  print(f"[gpu_scale] {name}: {shown}", flush=True)
  start = time.time()
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
  row = {"row": name, "command": shown,
         "date": datetime.date.today().isoformat(), "host": platform.node() or "?",
         "wall_s": round(time.time() - start), "returncode": result.returncode}
  if result.returncode:
    lines = [l for l in result.stderr.splitlines() if not l.startswith(("W0000", "I0000"))]
    row["error"] = next((l for l in lines if "Check failed" in l or l.startswith("error")),
                        lines[-1] if lines else "")
    return row
  report = json.load(open(os.path.join(out, name, "compile_report.json")))
  step = report["steps"]["pretrain"]
  r = step["roofline"]
  row.update(gpu=report["gpu"]["device_kind"], devices=report["topology"]["devices"],
             per_gpu=step["examples_per_device"], compute_dtype=report["compute_dtype"],
             memory_gib=step["memory_needed_lower_bound"] / 2**30,
             usable_gib=report["gpu"]["usable_bytes"] / 2**30, tflop=step["flops"] / 1e12,
             conv_tflop=step["convolution_flops"] / 1e12, gb_moved=step["bytes_accessed"] / 1e9,
             all_reduce_mb=step["collectives"].get("all-reduce", {}).get("bytes", 0) / 1e6,
             calls=step["library_calls"], largest_batch=step["largest_batch_per_gpu_estimate"],
             step_ms=r["step_s"] * 1e3, bound=r["bound"], images_per_s=r["images_per_s_per_chip"],
             mfu_ceiling=r["mfu_ceiling"], compile_s=step["compile_s"],
             versions=report["versions"])
  return row


def table(rows) -> str:
  head = ("| row | GPU | per GPU | memory >= GiB (of usable) | TFLOP (conv) | GB moved | "
          "all-reduce MB | cuDNN/cuBLAS/Triton | largest batch/GPU* | roofline* ms | img/s/GPU* |")
  out = [head, "|" + "---|" * 11]
  for r in rows:
    if r.get("returncode"):
      out.append(f"| {r['row']} | compile failed: `{r['error'][:120]}` |" + " |" * 9)
      continue
    c = r["calls"]
    out.append(f"| {r['row']} | {r['gpu']} x{r['devices']} | {r['per_gpu']:g} | "
               f"{r['memory_gib']:.1f} ({r['usable_gib']:.1f}) | {r['tflop']:.2f} "
               f"({r['conv_tflop']:.2f}) | {r['gb_moved']:.0f} | {r['all_reduce_mb']:.0f} | "
               f"{c['cudnn']}/{c['cublas']}/{c['triton']} | {r['largest_batch']} | "
               f"{r['step_ms']:.0f} {r['bound']} | {r['images_per_s']:.0f} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="all", help=f"comma-separated, or all: {', '.join(ROWS)}")
  parser.add_argument("--out", default="runs/gpu_scale")
  parser.add_argument("--force", action="store_true", help="rerun rows already recorded")
  parser.add_argument("--table", action="store_true", help="print the table of --out's rows")
  args = parser.parse_args()
  path = os.path.join(args.out, "rows.jsonl")
  done = {}
  if os.path.exists(path):
    for line in open(path):
      done[json.loads(line)["row"]] = json.loads(line)
  if args.table:
    print(table(done.values()))
    return
  names = list(ROWS) if args.rows == "all" else args.rows.split(",")
  os.makedirs(args.out, exist_ok=True)
  for name in names:
    if name in done and not args.force:
      continue
    row = run_row(name, args.out)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
