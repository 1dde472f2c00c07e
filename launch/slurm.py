r"""Writes and submits a SLURM batch job that runs byol_jax on several GPU nodes.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu \
        --config=resnet50_imagenet --workdir=/shared/runs/r50 \
        --config.data.data_dir=/shared/tensorflow_datasets

renders launch/slurm_gpu.sbatch.template into <log_dir>/<job_name>.sbatch and
submits it with `sbatch`. First, on this host, the pre-flight: `python -m
byol_jax.main --job=compile` compiles the job's steps for --gpu_type nodes
(`--config.compile.topology=<gpu_type>:<nodes>x<gpus_per_node>`) with JAX's CUDA
plugin (`pip install "jax[cuda12]==<jax version>"`; no GPU needed) and prints
memory per GPU and a roofline estimate; a config that does not fit stops the
launch before anything is queued (--skip_compile_check skips it). The job runs `srun python -m byol_jax.main ...`:

* `--mode=per_gpu` (default): one process per GPU (`--ntasks-per-node=G
  --gpus-per-task=1`); each process drives the one GPU SLURM binds it to.
* `--mode=per_node`: one process per node driving all its G GPUs.

Both give the same training (the mesh spans every GPU of the job either way);
per_gpu is the usual choice, per_node starts fewer processes (fewer input
pipelines, one per node, each G times larger). Arguments of the form
`--config.a.b=v` are passed to byol_jax.main. `--dry-run` prints the rendered
script and the sbatch command without writing or submitting anything.
"""

import argparse
import os
import pathlib
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = pathlib.Path(__file__).resolve().parent / "slurm_gpu.sbatch.template"

# preflight/gpu.py's GPUS; the steps each job runs, which the pre-flight compiles.
GPU_TYPES = ("a100-40gb", "a100-80gb", "h100", "h200")
PREFLIGHT_STEPS = {"pretrain": ("pretrain", "eval"), "linear_eval": ("linear_eval",),
                   "knn": ("eval",)}

PER_GPU_NOTE = (
    "# One process per GPU: SLURM binds each task to its GPU (--gpus-per-task=1), which\n"
    "# the task sees as device 0. byol_jax.train.parallel tells JAX so; JAX's SLURM default\n"
    "# (device number SLURM_LOCALID) names a GPU the task cannot see.")
PER_NODE_NOTE = (
    "# One process per node: it drives every GPU of its node. JAX's SLURM default\n"
    "# would give the task only device number SLURM_LOCALID (0).")


def parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      allow_abbrev=False, prog="launch/slurm.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--mode", choices=("per_gpu", "per_node"), default="per_gpu",
                      help="One process per GPU, or one per node.")
  parser.add_argument("--cpus_per_gpu", type=int, default=8,
                      help="CPU cores per GPU, mostly for the input pipeline (JPEG decoding).")
  parser.add_argument("--time", default="24:00:00", help="Wall-clock limit (HH:MM:SS or D-HH).")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--qos", default=None)
  parser.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=True,
                      help="Whole nodes only (default); --no-exclusive to share them.")
  parser.add_argument("--job_name", default=None, help="Default: byol_<config>.")
  parser.add_argument("--log_dir", default="slurm_logs",
                      help="Where the script and the job's output file go.")
  parser.add_argument("--python", default=sys.executable,
                      help="Interpreter on the compute nodes (default: this one, which suits "
                      "a virtualenv on a shared file system).")
  parser.add_argument("--setup", action="append", default=[],
                      help="Shell line run before srun, e.g. 'module load cuda/12.4' (repeatable).")
  parser.add_argument("--config", required=True, help="Named config or config file, as for main.")
  parser.add_argument("--workdir", required=True,
                      help="Shared directory (or gs:// path) for checkpoints and metrics.")
  parser.add_argument("--job", default="pretrain",
                      choices=("pretrain", "linear_eval", "knn", "export"))
  parser.add_argument("--gpu_type", choices=GPU_TYPES, default=None,
                      help="The nodes' GPUs, for the pre-flight compile (required unless "
                      "--skip_compile_check).")
  parser.add_argument("--skip_compile_check", action="store_true",
                      help="Submit without first compiling the job for --gpu_type on this host "
                      "(the pre-flight that refuses what does not fit).")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the script and the sbatch command; write and submit nothing.")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.* overrides are "
                 "passed through to byol_jax.main)")
  if args.nodes < 1 or args.gpus_per_node < 1 or args.cpus_per_gpu < 1:
    parser.error("--nodes, --gpus_per_node and --cpus_per_gpu must be at least 1.")
  if args.gpu_type is None and not args.skip_compile_check:
    parser.error(f"--gpu_type ({', '.join(GPU_TYPES)}) names the nodes' GPUs for the pre-flight "
                 "compile; or pass --skip_compile_check to submit without it.")
  args.overrides = rest
  args.job_name = args.job_name or "byol_" + re.sub(r"\W", "_", pathlib.Path(
      args.config.partition(":")[0]).stem)
  args.log_dir = os.path.abspath(args.log_dir)
  if "://" not in args.workdir:
    # The tasks start in the repository (--chdir); a relative path means here.
    args.workdir = os.path.abspath(args.workdir)
  return args


def main_command(args) -> str:
  return shlex.join([args.python, "-m", "byol_jax.main", f"--config={args.config}",
                     f"--workdir={args.workdir}", f"--job={args.job}", *args.overrides])


def render(args) -> str:
  """The batch script: the template with this job's values filled in."""
  per_gpu = args.mode == "per_gpu"
  directives = [f"#SBATCH --{key}={value}" for key, value in
                (("partition", args.partition), ("account", args.account), ("qos", args.qos))
                if value]
  if args.exclusive:
    directives.append("#SBATCH --exclusive")
  values = dict(
      nodes=args.nodes,
      gpus_per_node=args.gpus_per_node,
      mode_text=("one process per GPU" if per_gpu else "one process per node"),
      job_name=args.job_name,
      tasks_per_node=args.gpus_per_node if per_gpu else 1,
      gpu_directive=("--gpus-per-task=1" if per_gpu else f"--gpus-per-node={args.gpus_per_node}"),
      cpus_per_task=args.cpus_per_gpu * (1 if per_gpu else args.gpus_per_node),
      time=args.time,
      log_dir=args.log_dir,
      repo=REPO,
      extra_directives="\n".join(directives),
      setup="\n".join(args.setup),
      device_note=PER_GPU_NOTE if per_gpu else PER_NODE_NOTE,
      device_export=("" if per_gpu else "export JAX_LOCAL_DEVICE_IDS=" +
                     ",".join(str(i) for i in range(args.gpus_per_node))),
      command=main_command(args),
  )
  script = string.Template(TEMPLATE.read_text()).substitute(values)
  return re.sub(r"\n{3,}", "\n\n", script)  # blank placeholders leave no gaps


def script_path(args) -> str:
  return os.path.join(args.log_dir, f"{args.job_name}.sbatch")


def sbatch_command(args):
  return ["sbatch", "--parsable", script_path(args)]


def preflight_command(args) -> Optional[List[str]]:
  """The local compile of the job's steps for the nodes' GPUs, or None when there is none."""
  steps = PREFLIGHT_STEPS.get(args.job)
  if args.skip_compile_check or steps is None:
    return None
  workdir = os.path.join(tempfile.gettempdir(), f"byol_jax_preflight_{args.job_name}")
  return [sys.executable, "-m", "byol_jax.main", "--job=compile", f"--config={args.config}",
          f"--config.compile.topology={args.gpu_type}:{args.nodes}x{args.gpus_per_node}",
          f"--config.compile.steps={steps!r}", *args.overrides, f"--workdir={workdir}"]


def preflight(args, cmd: List[str]) -> bool:
  """Runs the pre-flight compile; False (and says why) when it fails."""
  print(f"[slurm] pre-flight: compile for {args.nodes} x {args.gpus_per_node} {args.gpu_type} "
        f"on this host: {shlex.join(cmd)}", flush=True)
  pythonpath = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
  # JAX must not start CUDA here: the compile needs no GPU (a login node may have none).
  env = {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}
  if subprocess.call(cmd, env=env):
    print(f"error: the pre-flight compile for {args.gpu_type} failed (see the line above); "
          "nothing was submitted. Change the config as it says, or pass --skip_compile_check "
          "to submit anyway.", file=sys.stderr)
    return False
  return True


def check_overrides(args) -> None:
  """Catches a misspelt config or field here, not after the job waited in the queue."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.exit_on_bad_command_line(args.config, args.overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  check_overrides(args)
  script = render(args)
  cmd = sbatch_command(args)
  check = preflight_command(args)
  if args.dry_run:
    if check:
      print(f"# pre-flight on this host:\n{shlex.join(check)}")
    print(f"# {script_path(args)}")
    print(script, end="")
    print(f"# submit with:\n{shlex.join(cmd)}")
    return 0
  if shutil.which("sbatch") is None:
    sys.exit("error: sbatch not found: run this on a SLURM login node (or use --dry-run).")
  if check and not preflight(args, check):
    return 1
  os.makedirs(args.log_dir, exist_ok=True)
  with open(script_path(args), "w") as f:
    f.write(script)
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    sys.exit(f"error: sbatch refused the job (status {result.returncode}): "
             f"{result.stderr.strip()}\nThe script is {script_path(args)}.")
  job_id = result.stdout.strip().split(";")[0]
  print(f"submitted job {job_id}: {script_path(args)}")
  print(f"output: {os.path.join(args.log_dir, f'{args.job_name}-{job_id}.out')} "
        f"(follow it with tail -f; cancel with scancel {job_id})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
