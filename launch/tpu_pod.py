r"""Runs byol_jax on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips).

    python launch/tpu_pod.py --project=my-proj --zone=us-central2-b \
        --tpu_name=byol-v4-32 --accelerator_type=v4-32 --create \
        --package=gs://my-bucket/dist/byol_jax-0.1.0.tar.gz \
        --config=resnet50_imagenet --workdir=gs://my-bucket/runs/r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --teardown

First, on this host, the pre-flight: `python -m byol_jax.main --job=compile` compiles
the job's steps for --accelerator_type with the TPU compiler (libtpu, `pip install -e
".[tpu]"`; no TPU needed, a few minutes for ResNet-50) and prints their memory per chip
and a roofline estimate. A config that does not fit the chip's HBM stops the launch
there, before anything is created or paid for (--skip_compile_check skips it).

Then the stages, each one `gcloud compute tpus tpu-vm ...` command:

1. `create` the TPU VM (--create), or check that it exists (--reuse);
2. install the package on every worker (`ssh --worker=all`): a Python >= 3.11
   virtualenv, then `pip install "byol_jax[tpu] @ <package>"`, where the package
   is a gs:// sdist/wheel (copied to the worker first), a git+https:// URL or
   an https:// archive (skip with --noinstall on a VM that already has it);
3. run `python -m byol_jax.main --config=... --workdir=...` on every worker at
   once (`ssh --worker=all`), streaming their output here and appending it to
   ~/byol_jax.log on each worker. JAX finds the other hosts of the pod itself
   (jax.distributed reads the worker list from the TPU VM metadata);
4. `delete` the TPU VM when asked (--teardown), whether or not the run succeeded.

Arguments of the form `--config.a.b=v` are passed to byol_jax.main unchanged.
`--dry-run` prints every command instead of running it (gcloud is not needed).
"""

import argparse
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import sys
from typing import List, Optional, Sequence, Tuple

REPO = pathlib.Path(__file__).resolve().parents[1]
REMOTE_VENV = "byol_venv"            # relative to the worker's home directory
REMOTE_LOG = "byol_jax.log"
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
# The steps each job runs on the pod, which the pre-flight compiles (none for export).
PREFLIGHT = "pre-flight: compile for the slice on this host"
PREFLIGHT_STEPS = {"pretrain": ("pretrain", "eval"), "linear_eval": ("linear_eval",),
                   "knn": ("eval",)}


def parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      allow_abbrev=False, prog="launch/tpu_pod.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--project", required=True)
  parser.add_argument("--zone", required=True)
  parser.add_argument("--tpu_name", required=True)
  parser.add_argument("--accelerator_type", default="v4-32", help="e.g. v4-8, v4-32, v5p-64.")
  parser.add_argument("--runtime_version", default=DEFAULT_RUNTIME,
                      help="TPU VM software version (the OS image).")
  how = parser.add_mutually_exclusive_group(required=True)
  how.add_argument("--create", action="store_true", help="Create the TPU VM first.")
  how.add_argument("--reuse", action="store_true", help="Use an existing TPU VM.")
  parser.add_argument("--spot", action="store_true", help="Create it as a Spot VM (cheaper, "
                      "preemptible; rerun with --reuse or --create to resume).")
  parser.add_argument("--package", default=None,
                      help="What to pip install on the workers: gs://.../byol_jax-*.tar.gz or "
                      ".whl, git+https://...@REF, or an https:// archive.")
  parser.add_argument("--noinstall", dest="install", action="store_false",
                      help="Skip the install stage (the workers already have the package).")
  parser.add_argument("--python", default="python3.11",
                      help="Interpreter for the workers' virtualenv (apt-installed if missing).")
  parser.add_argument("--config", required=True, help="Named config or config file, as for main.")
  parser.add_argument("--workdir", required=True,
                      help="gs:// directory for checkpoints and metrics, shared by all hosts.")
  parser.add_argument("--job", default="pretrain",
                      choices=("pretrain", "linear_eval", "knn", "export"))
  parser.add_argument("--teardown", action="store_true", help="Delete the TPU VM at the end.")
  parser.add_argument("--skip_compile_check", action="store_true",
                      help="Launch without first compiling the job for --accelerator_type on "
                      "this host (the pre-flight that refuses what does not fit).")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the gcloud commands; run nothing.")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.* overrides are "
                 "passed through to byol_jax.main)")
  args.overrides = rest
  if not args.workdir.startswith("gs://"):
    parser.error(f"--workdir must be a gs:// path, got {args.workdir!r}: every host of the pod "
                 "writes and reads the same checkpoints, and a worker's local disk is its own.")
  if args.install and not args.package:
    parser.error("--package is required to install byol_jax on the workers (or pass "
                 "--noinstall if they already have it).")
  return args


def _tpu(args, verb: str, *extra: str) -> List[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.tpu_name,
          f"--project={args.project}", f"--zone={args.zone}", *extra]


def create_command(args) -> List[str]:
  cmd = _tpu(args, "create", f"--accelerator-type={args.accelerator_type}",
             f"--version={args.runtime_version}")
  return cmd + ["--spot"] if args.spot else cmd


def describe_command(args) -> List[str]:
  return _tpu(args, "describe", "--format=value(state)")


def ssh_all_command(args, remote: str) -> List[str]:
  """One command line on every worker of the slice, in parallel."""
  return _tpu(args, "ssh", "--worker=all", f"--command={remote}")


def delete_command(args) -> List[str]:
  return _tpu(args, "delete", "--quiet")


def install_script(args) -> str:
  """The shell line that installs the package (with the `tpu` extra) into a virtualenv."""
  py = shlex.quote(args.python)
  pip = f"{REMOTE_VENV}/bin/pip"
  steps = [
      # The stock TPU VM images ship an older Python than byol_jax needs (3.11).
      f"(command -v {py} >/dev/null || (sudo apt-get update -qq && sudo "
      f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {py} {py}-venv))",
      f"{py} -m venv {REMOTE_VENV}",
      f"{pip} install -q --upgrade pip",
  ]
  source = args.package
  if source.startswith("gs://"):
    local = "/tmp/" + source.rstrip("/").rsplit("/", 1)[-1]  # pip reads the kind from the name
    steps.append(f"gcloud storage cp {shlex.quote(source)} {shlex.quote(local)}")
    source = "file://" + local
  steps.append(f"{pip} install -q {shlex.quote(f'byol_jax[tpu] @ {source}')}")
  # A rerun with the same version number would keep the old code otherwise.
  steps.append(f"{pip} install -q --force-reinstall --no-deps "
               f"{shlex.quote(f'byol_jax @ {source}')}")
  return " && ".join(steps)


def run_script(args) -> str:
  """The shell line that runs byol_jax.main on a worker, logging to ~/byol_jax.log too."""
  main = [f"{REMOTE_VENV}/bin/python", "-m", "byol_jax.main", f"--config={args.config}",
          f"--workdir={args.workdir}", f"--job={args.job}", *args.overrides]
  return f"set -o pipefail; {shlex.join(main)} 2>&1 | tee -a {REMOTE_LOG}"


def preflight_command(args) -> Optional[List[str]]:
  """The local compile of the job's steps for the slice, or None when there is none."""
  steps = PREFLIGHT_STEPS.get(args.job)
  if args.skip_compile_check or steps is None:
    return None
  workdir = os.path.join(tempfile.gettempdir(), f"byol_jax_preflight_{args.tpu_name}")
  return [sys.executable, "-m", "byol_jax.main", "--job=compile", f"--config={args.config}",
          f"--config.compile.topology={args.accelerator_type}",
          f"--config.compile.steps={steps!r}", *args.overrides, f"--workdir={workdir}"]


def plan(args) -> List[Tuple[str, List[str]]]:
  """(stage, command) in order; the teardown, if any, runs even after a failure."""
  preflight = preflight_command(args)
  stages = [(PREFLIGHT, preflight)] if preflight else []
  stages.append(("create", create_command(args)) if args.create
                else ("check that the TPU VM exists", describe_command(args)))
  if args.install:
    stages.append(("install byol_jax on every worker", ssh_all_command(args, install_script(args))))
  stages.append(("run on every worker", ssh_all_command(args, run_script(args))))
  if args.teardown:
    stages.append(("teardown", delete_command(args)))
  return stages


def check_overrides(args) -> None:
  """Catches a misspelt config or field here, not minutes later on the pod."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.exit_on_bad_command_line(args.config, args.overrides)


def _failure_hint(args, stage: str) -> str:
  if stage.startswith("check"):
    return (f"could not find TPU VM {args.tpu_name} in {args.project}/{args.zone} (create it "
            "with --create instead of --reuse, or check `gcloud auth list`)")
  if stage == "create":
    return f"could not create TPU VM {args.tpu_name} ({args.accelerator_type})"
  if stage.startswith("run"):
    return (f"the run failed on at least one worker; see the output above and ~/{REMOTE_LOG} "
            "on the workers. Rerun with --reuse --noinstall to resume from the last checkpoint")
  return "installing byol_jax on the workers failed; see the output above"


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  check_overrides(args)
  stages = plan(args)
  if args.dry_run:
    for stage, cmd in stages:
      print(f"# {stage}")
      print(shlex.join(cmd))
    return 0
  if shutil.which("gcloud") is None:
    sys.exit("error: gcloud is not installed or not on PATH; see "
             "https://cloud.google.com/sdk/docs/install (or use --dry-run to see the commands).")
  if stages[0][0] == PREFLIGHT:
    (stage, cmd), stages = stages[0], stages[1:]
    print(f"[tpu_pod] {stage}: {shlex.join(cmd)}", flush=True)
    pythonpath = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    if subprocess.call(cmd, env={**os.environ, "PYTHONPATH": pythonpath}):
      print(f"error: the pre-flight compile for {args.accelerator_type} failed (see the line "
            "above); nothing was created. Change the config as it says, or pass "
            "--skip_compile_check to launch anyway.", file=sys.stderr)
      return 1
  teardown = stages.pop() if args.teardown else None
  status = 0
  try:
    for stage, cmd in stages:
      print(f"[tpu_pod] {stage}: {shlex.join(cmd)}", flush=True)
      status = subprocess.call(cmd)
      if status != 0:
        print(f"error: {_failure_hint(args, stage)} (gcloud exited with status {status}).",
              file=sys.stderr)
        break
  except KeyboardInterrupt:
    status = 130
  finally:
    if teardown is not None:
      print(f"[tpu_pod] teardown: {shlex.join(teardown[1])}", flush=True)
      if subprocess.call(teardown[1]) != 0:
        print(f"error: could not delete TPU VM {args.tpu_name}; delete it yourself to stop "
              f"paying for it: {shlex.join(teardown[1])}", file=sys.stderr)
        status = status or 1
  return status


if __name__ == "__main__":
  sys.exit(main())
