"""The launchers' exact commands (dry runs), the local launcher's supervision of
failing processes (with a stand-in for byol_jax.main), and how
byol_jax.train.parallel joins a cluster under SLURM."""

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

from byol_jax.train import parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


def load_launcher(name):
  """launch/NAME.py as a module (launch/ is a folder of scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_launcher(name, *args, env=None, timeout=60):
  return subprocess.run([PY, str(REPO / "launch" / f"{name}.py"), *args], capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


# ----------------------------------------------------------------------------
# launch/local.py
# ----------------------------------------------------------------------------

def test_local_dry_run_prints_each_process_command_and_environment():
  result = run_launcher(
      "local", "--num_processes=3", "--devices_per_process=2", "--port=12345", "--dry-run",
      "--", "--config=demo", "--workdir=/tmp/w", "--config.steps=3",
      env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=false "
                        "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  exports = dict(line[len("export "):].split("=", 1) for line in lines
                 if line.startswith("export "))
  # The inherited device count is replaced, other XLA flags are kept.
  assert shlex.split(exports["XLA_FLAGS"]) == [
      "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"]
  assert exports["JAX_PLATFORMS"] == "cpu"
  assert exports["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:12345"
  assert exports["BYOL_HEARTBEAT_TIMEOUT_S"] == "20"
  assert exports["BYOL_SHUTDOWN_TIMEOUT_S"] == "60"
  assert exports["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
  commands = [shlex.split(line) for line in lines if line and not line.startswith(("#", "export"))]
  assert commands == [
      [PY, "-m", "byol_jax.main", "--config=demo", "--workdir=/tmp/w", "--config.steps=3",
       "--coordinator_address=127.0.0.1:12345", "--num_processes=3", f"--process_id={i}"]
      for i in range(3)]


def test_local_picks_a_free_loopback_port_when_none_is_given():
  local = load_launcher("local")
  port = local.free_port()
  assert 1024 <= port < 65536
  args = local.parse_args(["--", "--config=demo", "--workdir=/tmp/w"])
  assert args.port == 0 and args.num_processes == 2 and args.devices_per_process == 4
  assert args.failure_grace == args.heartbeat_timeout + 15


def test_local_requires_main_arguments():
  result = run_launcher("local", "--dry-run")
  assert result.returncode != 0
  assert "--config=demo --workdir=" in result.stderr


FAKE_MAIN = """
import signal, sys, time
process = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
mode = sys.argv[sys.argv.index("--mode") + 1]
print(f"hello from {process}", flush=True)
if mode == "ok":
    sys.exit(0)
if mode == "fail_and_hang":
    if process == 1:
        time.sleep(0.5)
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a jax.distributed process does
    time.sleep(600)
if mode == "fail_and_follow":
    if process == 1:
        time.sleep(0.5)
        sys.exit(3)
    time.sleep(1.5)
    print("lost my peer", flush=True)
    sys.exit(1)
"""


@pytest.fixture
def fake_python(tmp_path):
  """An 'interpreter' for --python that runs FAKE_MAIN instead of byol_jax.main."""
  script = tmp_path / "fake_main.py"
  script.write_text(FAKE_MAIN)
  wrapper = tmp_path / "fake_python"
  wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(PY)} {shlex.quote(str(script))} "$@"\n')
  wrapper.chmod(0o755)
  return str(wrapper)


def run_fake(fake_python, mode, *flags):
  start = time.monotonic()
  result = run_launcher("local", f"--python={fake_python}", *flags, "--",
                        "--config=demo", "--workdir=/tmp/w", "--mode", mode, timeout=60)
  return result, time.monotonic() - start


def test_local_prefixes_output_and_succeeds_when_all_succeed(fake_python):
  result, _ = run_fake(fake_python, "ok")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "[p0] hello from 0" in result.stdout and "[p1] hello from 1" in result.stdout
  assert "[launch] all 2 processes finished" in result.stdout


def test_local_stops_the_others_when_one_fails_and_names_it(fake_python):
  # Process 0 ignores SIGTERM, as JAX's preemption handler makes it: SIGKILL follows.
  result, seconds = run_fake(fake_python, "fail_and_hang", "--failure_grace=1")
  assert result.returncode == 3
  assert "[launch] process 1 exited with status 3" in result.stdout
  assert "[launch] stopping process 0" in result.stdout
  assert ("error: process 1 of 2 exited with status 3; stopped process(es) [0] that were "
          "still running.") in result.stderr
  local = load_launcher("local")
  assert seconds < 1 + local.KILL_AFTER_TERM_S + 10


def test_local_lets_the_others_exit_by_themselves_within_the_grace(fake_python):
  result, _ = run_fake(fake_python, "fail_and_follow", "--failure_grace=30")
  assert result.returncode == 3
  assert "[p0] lost my peer" in result.stdout
  assert "[launch] process 0 exited with status 1 by itself" in result.stdout
  assert "stopping process" not in result.stdout
  assert result.stderr.strip().endswith("error: process 1 of 2 exited with status 3.")


# ----------------------------------------------------------------------------
# launch/tpu_pod.py
# ----------------------------------------------------------------------------

PREFLIGHT = "pre-flight: compile for the slice on this host"
TPU_FLAGS = ["--project=proj", "--zone=us-central2-b", "--tpu_name=byol-pod",
             "--accelerator_type=v4-32", "--config=resnet50_imagenet",
             "--workdir=gs://bucket/runs/r50"]
OVERRIDES = ["--config.data.data_dir=gs://bucket/tfds", "--config.data.train_split=train[10000:]"]


def tpu_dry_run(*flags):
  """Dry-run commands by stage; PATH holds no gcloud, which a dry run must not need."""
  result = run_launcher("tpu_pod", *TPU_FLAGS, *flags, "--dry-run",
                        env={"PATH": "/nonexistent"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  stages = {}
  for title, command in zip(lines[::2], lines[1::2]):
    assert title.startswith("# ")
    stages[title[2:]] = shlex.split(command)
  return stages


def remote(cmd):
  flag = [a for a in cmd if a.startswith("--command=")]
  assert len(flag) == 1
  return flag[0][len("--command="):]


def test_tpu_dry_run_create_install_run_teardown():
  stages = tpu_dry_run("--create", "--package=gs://bucket/dist/byol_jax-0.1.0.tar.gz",
                       "--runtime_version=tpu-ubuntu2204-base", "--teardown", *OVERRIDES)
  assert list(stages) == [PREFLIGHT, "create", "install byol_jax on every worker",
                          "run on every worker", "teardown"]
  preflight = stages[PREFLIGHT]
  assert preflight[:5] == [PY, "-m", "byol_jax.main", "--job=compile",
                           "--config=resnet50_imagenet"]
  assert preflight[5:8] == ["--config.compile.topology=v4-32",
                            "--config.compile.steps=('pretrain', 'eval')", *OVERRIDES[:1]]
  assert preflight[8] == OVERRIDES[1] and preflight[9].startswith("--workdir=")
  where = ["--project=proj", "--zone=us-central2-b"]
  assert stages["create"] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "byol-pod", *where,
                              "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  install = stages["install byol_jax on every worker"]
  assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "byol-pod", *where]
  assert "--worker=all" in install
  steps = remote(install).split(" && ")
  assert ("gcloud storage cp gs://bucket/dist/byol_jax-0.1.0.tar.gz "
          "/tmp/byol_jax-0.1.0.tar.gz") in steps
  assert ("byol_venv/bin/pip install -q 'byol_jax[tpu] @ file:///tmp/byol_jax-0.1.0.tar.gz'"
          in steps)
  run = stages["run on every worker"]
  assert run[:8] == install[:8] and "--worker=all" in run
  script = remote(run)
  assert script.startswith("set -o pipefail; ") and script.endswith(" 2>&1 | tee -a byol_jax.log")
  main = shlex.split(script[len("set -o pipefail; "):-len(" 2>&1 | tee -a byol_jax.log")])
  assert main == ["byol_venv/bin/python", "-m", "byol_jax.main", "--config=resnet50_imagenet",
                  "--workdir=gs://bucket/runs/r50", "--job=pretrain", *OVERRIDES]
  assert stages["teardown"] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "byol-pod",
                                *where, "--quiet"]


def test_tpu_dry_run_reuse_without_install_from_git():
  stages = tpu_dry_run("--reuse", "--noinstall", "--job=knn", "--skip_compile_check")
  assert list(stages) == ["check that the TPU VM exists", "run on every worker"]
  assert stages["check that the TPU VM exists"][4:6] == ["describe", "byol-pod"]
  assert "--job=knn" in shlex.split(remote(stages["run on every worker"]).split("; ", 1)[1])
  stages = tpu_dry_run("--reuse", "--package=git+https://github.com/example/byol_jax@v0.1.0",
                       "--spot", "--job=knn")
  assert "--config.compile.steps=('eval',)" in stages[PREFLIGHT]
  steps = remote(stages["install byol_jax on every worker"]).split(" && ")
  assert ("byol_venv/bin/pip install -q 'byol_jax[tpu] @ "
          "git+https://github.com/example/byol_jax@v0.1.0'") in steps
  assert not any(s.startswith("gcloud storage") for s in steps)


def test_tpu_refuses_to_launch_when_the_preflight_compile_fails(tmp_path):
  """A failing pre-flight ends the launch before any gcloud command (here a slice name the
  compile job rejects at once; tests/test_compile.py has the out-of-memory case)."""
  calls = tmp_path / "gcloud_calls"
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
  gcloud.chmod(0o755)
  flags = [f for f in TPU_FLAGS if not f.startswith("--accelerator_type")]
  result = run_launcher("tpu_pod", *flags, "--accelerator_type=v4-12", "--create",
                        "--noinstall", "--teardown",
                        env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
  assert result.returncode == 1
  assert "Unknown TPU topology 'v4-12'" in result.stdout + result.stderr
  assert "nothing was created" in result.stderr and "--skip_compile_check" in result.stderr
  assert not calls.exists()


@pytest.mark.parametrize("flags, message", [
    (["--create", "--noinstall", "--workdir=/local/dir"], "--workdir must be a gs:// path"),
    (["--create"], "--package is required"),
    (["--create", "--noinstall", "--steps=3"], "unrecognized arguments: --steps=3"),
    (["--create", "--noinstall", "--config.optimizer.base_lrr=1"], "Unknown config field"),
    (["--noinstall"], "one of the arguments --create --reuse is required"),
])
def test_tpu_rejects_bad_flags_before_running_anything(flags, message):
  result = run_launcher("tpu_pod", *TPU_FLAGS, *flags, "--dry-run", env={"PATH": "/nonexistent"})
  assert result.returncode != 0
  assert message in result.stderr


# ----------------------------------------------------------------------------
# launch/slurm.py
# ----------------------------------------------------------------------------

def slurm_dry_run(*flags):
  result = run_launcher("slurm", "--nodes=4", "--gpus_per_node=8", "--partition=gpu",
                        "--config=resnet50_imagenet", "--workdir=/shared/runs/r50",
                        "--log_dir=/shared/logs", f"--python={PY}", "--gpu_type=h100", *flags,
                        "--config.data.data_dir=/shared/tfds", "--dry-run",
                        env={"PATH": "/nonexistent"})
  assert result.returncode == 0, result.stderr
  return result.stdout


def sbatch_directives(script):
  return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_line(script):
  lines = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
  assert len(lines) == 1
  return lines[0]


MAIN = [PY, "-m", "byol_jax.main", "--config=resnet50_imagenet", "--workdir=/shared/runs/r50",
        "--job=pretrain", "--config.data.data_dir=/shared/tfds"]


def test_slurm_one_process_per_gpu():
  out = slurm_dry_run("--setup=module load cuda/12.4")
  assert sbatch_directives(out) == [
      "--job-name=byol_resnet50_imagenet", "--nodes=4", "--ntasks-per-node=8",
      "--gpus-per-task=1", "--cpus-per-task=8", "--time=24:00:00",
      "--output=/shared/logs/%x-%j.out", f"--chdir={REPO}", "--partition=gpu", "--exclusive"]
  assert srun_line(out) == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8", *MAIN]
  # Each task's one bound GPU is mapped to device 0 by byol_jax.train.parallel, not here.
  assert "JAX_LOCAL_DEVICE_IDS" not in out.replace("# ", "")
  assert "\nmodule load cuda/12.4\n" in out
  assert out.rstrip().endswith("sbatch --parsable /shared/logs/byol_resnet50_imagenet.sbatch")


def test_slurm_one_process_per_node_uses_all_its_gpus():
  out = slurm_dry_run("--mode=per_node", "--no-exclusive", "--job_name=r50")
  directives = sbatch_directives(out)
  assert "--ntasks-per-node=1" in directives and "--gpus-per-node=8" in directives
  assert "--cpus-per-task=64" in directives and "--exclusive" not in directives
  assert "\nexport JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n" in out
  assert srun_line(out) == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=64", *MAIN]
  assert out.rstrip().endswith("sbatch --parsable /shared/logs/r50.sbatch")


def test_slurm_script_is_valid_bash(tmp_path):
  out = slurm_dry_run()
  script = out[out.index("#!/bin/bash"):].rsplit("# submit with:", 1)[0]
  assert script.startswith("#!/bin/bash\n")
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_slurm_preflight_compiles_the_job_for_the_nodes_gpus():
  out = slurm_dry_run("--config.data.train_split=train[10000:]")
  assert out.startswith("# pre-flight on this host:\n")
  preflight = shlex.split(out.splitlines()[1])
  assert preflight[:5] == [PY, "-m", "byol_jax.main", "--job=compile",
                           "--config=resnet50_imagenet"]
  assert preflight[5:7] == ["--config.compile.topology=h100:4x8",
                            "--config.compile.steps=('pretrain', 'eval')"]
  assert preflight[7:9] == ["--config.data.train_split=train[10000:]",
                            "--config.data.data_dir=/shared/tfds"]
  assert preflight[9].startswith("--workdir=")
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" in out
  slurm = load_launcher("slurm")
  flags = ["--config=demo", "--workdir=/r", "--gpu_type=a100-40gb", "--nodes=2"]
  check = slurm.preflight_command(slurm.parse_args([*flags, "--job=linear_eval"]))
  assert check[5:7] == ["--config.compile.topology=a100-40gb:2x8",
                        "--config.compile.steps=('linear_eval',)"]
  assert slurm.preflight_command(slurm.parse_args([*flags, "--job=export"])) is None
  assert slurm.preflight_command(slurm.parse_args([*flags, "--skip_compile_check"])) is None


def test_slurm_needs_the_gpu_type_for_its_preflight():
  result = run_launcher("slurm", "--config=resnet50_imagenet", "--workdir=/shared/r50",
                        "--dry-run", env={"PATH": "/nonexistent"})
  assert result.returncode == 2
  assert "--gpu_type (a100-40gb, a100-80gb, h100, h200)" in result.stderr
  assert "--skip_compile_check" in result.stderr


def test_slurm_refuses_to_submit_when_the_preflight_compile_fails(tmp_path):
  """A batch that the node's 8 GPUs cannot split fails the pre-flight (at once, or without
  the CUDA plugin at its install line); sbatch is never called."""
  calls = tmp_path / "sbatch_calls"
  sbatch = tmp_path / "sbatch"
  sbatch.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 1\n')
  sbatch.chmod(0o755)
  result = run_launcher("slurm", "--gpu_type=h100", "--config=demo", f"--log_dir={tmp_path}",
                        f"--workdir={tmp_path}/run", "--config.batch_size=12",
                        env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}, timeout=300)
  assert result.returncode == 1
  assert "nothing was submitted" in result.stderr and "--skip_compile_check" in result.stderr
  assert not calls.exists()


# ----------------------------------------------------------------------------
# byol_jax.train.parallel under SLURM (what the rendered scripts rely on)
# ----------------------------------------------------------------------------

SRUN_ENV = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-004]",
            "SLURM_NTASKS": "32", "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}


@pytest.mark.parametrize("extra, expected", [
    ({"CUDA_VISIBLE_DEVICES": "3"}, [0]),          # --gpus-per-task=1: its one GPU is device 0
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),  # sees all: JAX's [SLURM_LOCALID]
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}, None),  # explicit wins
])
def test_slurm_local_device_ids(extra, expected):
  assert parallel.slurm_local_device_ids({**SRUN_ENV, **extra}) == expected
  assert parallel.slurm_local_device_ids({"SLURM_JOB_ID": "1", **extra}) is None  # no srun step


@pytest.fixture
def recorded_initialize(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining anything."""
  calls = []
  monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR",
                                                     "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))]:
    monkeypatch.delenv(key)
  return calls


def test_initialize_distributed_under_srun_lets_jax_detect_slurm(recorded_initialize,
                                                                  monkeypatch):
  for key, value in {**SRUN_ENV, "CUDA_VISIBLE_DEVICES": "3"}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv(parallel.HEARTBEAT_TIMEOUT_ENV, "42")
  parallel.initialize_distributed()
  assert len(recorded_initialize) == 1
  call = recorded_initialize[0]
  # Coordinator, count and index are left to JAX's SLURM detection.
  assert (call["coordinator_address"], call["num_processes"], call["process_id"]) == (
      None, None, None)
  assert call["local_device_ids"] == [0]
  assert call["heartbeat_timeout_seconds"] == 42
  assert call["shutdown_timeout_seconds"] == parallel.DEFAULT_SHUTDOWN_TIMEOUT_S


@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "4242"},                       # a bare salloc shell: no srun step
    {**SRUN_ENV, "SLURM_NTASKS": "1"},              # a one-task step
    {},                                             # no cluster at all
])
def test_initialize_distributed_starts_nothing_for_a_lone_process(recorded_initialize,
                                                                  monkeypatch, env):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  parallel.initialize_distributed()
  assert recorded_initialize == []
