"""The compile job for NVIDIA GPUs: a config's steps compiled for A100/H100/H200 nodes on a
host without any GPU, and what the compiler says of them.

    python -m byol_jax.main --job=compile --config=resnet50_imagenet \\
        --config.compile.topology=h100x8

(`jobs/compile.py` hands GPU names here.) Compiles every step `build_steps`
returns with JAX's CUDA plugin (`pip install "jax[cuda12]==<jax version>"`)
for the GPUs of `preflight/gpu.py`, and prints per GPU, for each step: memory
against the GPU's share JAX may take (a LOWER BOUND: cuDNN's workspaces are
chosen by autotuning, which needs a GPU), FLOPs with the cuDNN convolutions
counted (`preflight/gpu_cost.py`), bytes, all-reduce bytes, a roofline ESTIMATE,
the cuDNN / cuBLAS / Triton calls, and the largest batch per GPU that fits with
10% to spare (an estimate); writes compile_report.json. A step that does not fit
ends the job with one line: needs / has / what to change.
"""

import math
import os

from byol_jax.errors import ConfigError
from byol_jax.jobs import compile as compile_job
from byol_jax.preflight import compile as compile_lib
from byol_jax.preflight import gpu, roofline

# What launch/slurm_gpu.sbatch.template gives JAX (XLA_PYTHON_CLIENT_MEM_FRACTION); JAX's
# own default is 0.75.
MEM_FRACTION = 0.9
HEADROOM = 0.1
GIB = 2.0**30


def run(config, workdir) -> dict:
  cc = config.compile
  topo = gpu.parse(cc.topology)
  if cc.num_slices != 1:
    raise ConfigError(f"compile.num_slices is for TPU slices; for several GPU nodes name them "
                      f"in the topology: --config.compile.topology={topo.gpu}:"
                      f"{cc.num_slices}x{topo.gpus_per_node}.")
  config, steps = compile_job.checked_steps(config, lambda: gpu.devices(topo))

  spec, chip = gpu.GPUS[topo.gpu], gpu.chip(topo.gpu)
  has = spec.memory_bytes * MEM_FRACTION
  report = {"note": "roofline figures are ESTIMATES from FLOPs and bytes counted in the "
                    "optimised HLO (preflight/gpu_cost.py), not measurements; memory is a lower "
                    "bound (cuDNN workspaces are chosen by autotuning, which needs a GPU)",
            "topology": dict(topo._asdict(), topology_name=topo.topology_name,
                             devices=topo.num_devices),
            "gpu": dict(spec._asdict(), usable_bytes=has, mem_fraction=MEM_FRACTION),
            "versions": gpu.versions(), "batch_size": config.batch_size,
            "compute_dtype": config.compute_dtype, "model": config.model.to_dict(), "steps": {}}
  print(f"[compile] {topo.name} = {topo.nodes} node(s) x {topo.gpus_per_node} {spec.device_kind}"
        f" ({spec.memory_bytes / GIB:.1f} GiB; JAX may take {MEM_FRACTION:.0%}: "
        f"{has / GIB:.1f} GiB); batch {config.batch_size} "
        f"({config.batch_size / topo.num_devices:g} per GPU), {config.compute_dtype}; "
        f"cuDNN {report['versions']['cudnn']}", flush=True)
  if "xla_gpu_enable_triton_gemm=false" not in os.environ.get("XLA_FLAGS", ""):
    print(TRITON_HINT, flush=True)
  print(HEADER, flush=True)
  for name, step in steps.items():
    hlo = os.path.join(workdir or ".", f"{name}.hlo.txt") if cc.save_hlo else None
    row = compile_lib.compile_step(name, step, hlo)
    per_device = step.examples / topo.num_devices
    row["examples_per_device"] = per_device
    row["roofline"] = roofline.estimate(row["flops"], row["bytes_accessed"], per_device, chip)
    need = row["memory"]["total"]
    resident = compile_job.RESIDENT.get(name)
    if resident is not None and "pretrain" in steps:  # the train state stays in memory
      need += (compile_job._nbytes(steps["pretrain"].args[0])
               - compile_job._nbytes(step.args[:resident]))
    fixed = compile_job._nbytes(step.args[:-1])  # all but the batch: does not grow with it
    row["memory_needed_lower_bound"], row["memory_fraction"] = need, need / has
    row["largest_batch_per_gpu_estimate"] = (
        None if name in compile_job.FEATURE_STEPS  # over a whole split, not a batch
        else gpu.largest_batch(per_device, need, fixed, has, HEADROOM))
    report["steps"][name] = row
    print(_line(name, row, has), flush=True)
  path = os.path.join(workdir or ".", compile_job.REPORT)
  compile_job._write(path, report)
  print(f"[compile] roofline = max(FLOPs / bf16 dense peak {chip.bf16_flops / 1e12:.0f} TFLOP/s, "
        f"bytes / {chip.hbm_bandwidth / 1e12:.2f} TB/s): an ESTIMATE, not a measurement; memory "
        f"is a lower bound (no cuDNN workspace: nothing is autotuned without a GPU). "
        f"Report: {path}", flush=True)
  over = [(n, r) for n, r in report["steps"].items() if r["memory_fraction"] > 1.0]
  if over:
    name, row = max(over, key=lambda item: item[1]["memory_fraction"])
    raise ConfigError(does_not_fit(name, row, has, config, topo))
  return report


# A CHECK failure ends the process before any line of ours: say what to do beforehand.
TRITON_HINT = ("[compile] If XLA aborts below in its Triton GEMM fusion "
               "(triton_tiling_propagation.cc; jax 0.10.2 does on GN+WS, ResNet-200 and two-pass "
               "steps), rerun with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false, and run the job "
               "with it too (experiments/gpu_scale.md).")
HEADER = (f"  {'step':<12}{'compile':>8}  {'memory per GPU (>=)':<24}{'TFLOP':>7}{'conv':>7}"
          f"{'GB moved':>9}{'all-reduce':>12}  {'cuDNN/cuBLAS/Triton':<20}"
          f"{'max batch':>10}   roofline ESTIMATE per step")


def _line(name: str, row: dict, has: float) -> str:
  r, calls = row["roofline"], row.get("library_calls", {})
  tight = " tight" if row["memory_fraction"] > 1 - HEADROOM else ""
  memory = (f"{row['memory_needed_lower_bound'] / GIB:.2f} / {has / GIB:.1f} GiB "
            f"{row['memory_fraction']:.0%}{tight}")
  all_reduce = row["collectives"].get("all-reduce", {}).get("bytes", 0)
  kernels = "/".join(str(calls.get(k, 0)) for k in ("cudnn", "cublas", "triton"))
  return (f"  {name:<12}{row['compile_s']:>6.0f} s  {memory:<24}{row['flops'] / 1e12:>7.3f}"
          f"{row.get('convolution_flops', 0) / 1e12:>7.3f}{row['bytes_accessed'] / 1e9:>9.2f}"
          f"{all_reduce / 1e6:>9.1f} MB  {kernels:<20}"
          f"{row['largest_batch_per_gpu_estimate'] or '-':>10}   {r['step_s'] * 1e3:.1f} ms "
          f"{r['bound']}-bound, {r['images_per_s_per_chip']:.0f} img/s/GPU, "
          f"MFU <= {r['mfu_ceiling']:.0%}")


def does_not_fit(step: str, row: dict, has: float, config, topo) -> str:
  """One line: what the step needs, what a GPU gives JAX, what to change."""
  options = []
  field = compile_job.BATCH_FIELDS.get(step)
  fits = row["largest_batch_per_gpu_estimate"] or 0
  if step == "knn":
    options.append("--config.eval.knn_bank_dtype=bfloat16")
  if field and fits >= 1:
    schedule = "" if step == "eval" else "; the learning rate follows base_lr x batch / 256"
    options.append(f"--config.{field}={fits * topo.num_devices} ({fits} per GPU{schedule})")
  if config.compute_dtype != "bfloat16" and step == "pretrain":
    options.append("--config.compute_dtype=bfloat16")
  if not config.model.remat and step not in ("eval", *compile_job.FEATURE_STEPS):
    options.append("--config.model.remat=True (recompute activations in the backward pass)")
  more = 2 ** math.ceil(math.log2(topo.num_devices * row["memory_fraction"] / (1 - HEADROOM)))
  nodes = max(1, more // 8)
  options.append(f"more GPUs: --config.compile.topology={topo.gpu}:{nodes}x{min(more, 8)}")
  return (f"The {step} step needs at least {row['memory_needed_lower_bound'] / GIB:.2f} GiB per "
          f"GPU; a {gpu.GPUS[topo.gpu].device_kind} gives JAX {has / GIB:.2f} GiB. To fit it, use "
          + ", or ".join(options) + ".")
