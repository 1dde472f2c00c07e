"""Multi-process training on one machine, through launch/local.py.

Each run is a real job: separate `python -m byol_jax.main` processes joined by
jax.distributed over loopback, with simulated CPU devices. Checked here:

1. 2 processes x 4 devices, 1 x 8 and 1 x 1 train to the same losses and the
   same final TrainState (the pipeline assembles the same global batch whatever
   the process count, and BatchNorm statistics are global);
2. SIGKILL of one process makes the other exit non-zero by itself within
   DEAD_PEER_BOUND_S, saying so, and rerunning the same command resumes from
   the last checkpoint and ends where the uninterrupted 2 x 4 run ended.

That the processes' data shards are disjoint and cover an epoch is tested on
the pipeline itself (tests/test_input_pipeline.py: test_process_shards_are_*,
test_process_rows_concatenate_*), not repeated here.

Speed: every run has the same config and the runs share a persistent
compilation cache (later 2 x 4 runs load programs the first compiled), and the
XLA CPU backend compiles at -O0 (about half the compile time; the steps are
tiny). Every launch runs in its own process group under a hard
timeout, so a hang fails the test instead of blocking CI.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local.py"

# The demo's model as shipped (zero-initialised residual branches included), narrower.
MODEL = ["--config.model.base_channels=8", "--config.model.projector_hidden=32",
         "--config.model.predictor_hidden=32", "--config.model.projection_dim=16"]
STEPS = 3  # float differences between device counts stay tiny this early
TINY = ["--config=demo", f"--config.steps={STEPS}", "--config.batch_size=16",
        "--config.data.image_size=16", "--config.data.verify_images=none",
        "--config.eval.every_steps=-1", "--config.log_every_steps=1",
        # A checkpoint every step: the interrupted run has one to resume from early.
        "--config.checkpoint.every_steps=1", *MODEL]

HEARTBEAT_S = 10
# A killed non-coordinator is noticed by process 0 when its heartbeats stop
# (HEARTBEAT_S); the rest is slack for a loaded machine.
DEAD_PEER_BOUND_S = HEARTBEAT_S + 15
LAUNCH_TIMEOUT_S = 300


class Launch:
  """One launch/local.py job in its own process group, its output collected."""

  def __init__(self, workdir, *, processes, devices, cache_dir):
    self.lines = []
    self._done_reading = threading.Event()
    env = {**os.environ,
           "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(LAUNCHER), f"--num_processes={processes}",
           f"--devices_per_process={devices}", f"--heartbeat_timeout={HEARTBEAT_S}",
           "--failure_grace=60", "--", *TINY, f"--workdir={workdir}"]
    self.popen = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  start_new_session=True)
    self.started = time.monotonic()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.popen.stdout:
      self.lines.append(line.rstrip("\n"))
    self._done_reading.set()

  @property
  def output(self) -> str:
    return "\n".join(self.lines)

  def tail(self, n=60) -> str:
    return "\n".join(self.lines[-n:])

  def check_time(self):
    if time.monotonic() - self.started > LAUNCH_TIMEOUT_S:
      self.kill()
      pytest.fail(f"the job took over {LAUNCH_TIMEOUT_S} s and was killed:\n{self.tail()}")

  def wait(self) -> int:
    """The launcher's exit status; a hung job is killed and fails the test."""
    while self.popen.poll() is None:
      self.check_time()
      time.sleep(0.2)
    self._done_reading.wait(timeout=10)
    return self.popen.returncode

  def kill(self):
    try:
      os.killpg(self.popen.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.popen.wait()


def run_to_end(launch: Launch) -> Launch:
  code = launch.wait()
  assert code == 0, f"the job failed with status {code}:\n{launch.tail()}"
  return launch


def metrics(workdir):
  with open(os.path.join(workdir, "pretrain_metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def committed_steps(workdir):
  """Checkpoint steps orbax has finished writing (in-progress ones have a tmp suffix)."""
  root = pathlib.Path(workdir, "checkpoints")
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def final_state(workdir, step):
  """Every array of the TrainState saved at `step`, by tree path, as numpy.

  Restored onto one local device whatever topology wrote it (the checkpoint of
  a 2-process run is restored by this single process).
  """
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  arrays = {}
  for item in ("online", "train"):  # the checkpoint's two items of the TrainState
    path = os.path.join(workdir, "checkpoints", str(step), item)
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    state = checkpointer.restore(path, target)
    checkpointer.close()
    arrays.update({item + jax.tree_util.keystr(p): np.asarray(v)
                   for p, v in jax.tree_util.tree_leaves_with_path(state)})
  return arrays


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def equal_runs(tmp_path_factory, cache_dir):
  """Workdirs of the same run as 2x4, 1x8 and 1x1 (processes x devices)."""
  root = tmp_path_factory.mktemp("topologies")
  shapes = {"2x4": (2, 4), "1x8": (1, 8), "1x1": (1, 1)}
  # All at once: each compiles on its own, and two cores are better shared than idle.
  launches = {name: Launch(root / name, processes=p, devices=d, cache_dir=cache_dir)
              for name, (p, d) in shapes.items()}
  try:
    for launch in launches.values():
      run_to_end(launch)
  finally:
    for launch in launches.values():
      if launch.popen.poll() is None:
        launch.kill()
  return {name: root / name for name in shapes}


def test_process_counts_give_the_same_losses(equal_runs):
  reference = metrics(equal_runs["2x4"])
  assert [m["step"] for m in reference] == list(range(1, STEPS + 1))
  for name in ("1x8", "1x1"):
    other = metrics(equal_runs[name])
    assert [m["step"] for m in other] == [m["step"] for m in reference]
    for key in ("loss", "byol_loss", "probe_loss", "projection_std"):
      np.testing.assert_allclose([m[key] for m in other], [m[key] for m in reference],
                                 rtol=1e-5, atol=1e-5, err_msg=f"{key}: {name} vs 2x4")


def test_process_counts_give_the_same_final_state(equal_runs):
  """Parameters and BN statistics agree elementwise; the LARS momentum (raw gradient sums)
  agrees per tensor in norm.

  Why not the momentum elementwise: with the demo's zero-initialised residual branches, one
  BN offset's momentum came out 2.0e-4 apart (0.25%, channel 0 of layer1_0/bn2 and, by the
  same 2.03e-4, of layer1_1/bn2) in 2x4 against 1x8 and 1x1, which agree with each other to
  2e-8; every parameter agreed to 1e-5. A float sum grouped otherwise is off by ~1e-7 here,
  not 2e-4: this is one position's gradient counted in one layout and not in another, as
  happens where a ReLU's input is ~0 (a block whose branch starts at 0 adds a BN offset of
  ~1e-5 to a shortcut that is exactly 0 wherever the stem's ReLU is off), so its on/off
  decision follows the last bits. It is at most one position's share of a sum over 4,096:
  a quarter per cent of the tensor's norm (6e-4), hence 1% per tensor. A bias just before
  a BatchNorm has a gradient of exactly 0 in exact arithmetic: its float residue (~1e-7)
  differs wholly between layouts, hence the absolute 1e-5.
  (experiments/README.md, "Process layouts and the demo's zero init".)
  """
  reference = final_state(equal_runs["2x4"], STEPS)
  assert any(k.startswith("online") for k in reference)
  for name in ("1x8", "1x1"):
    other = final_state(equal_runs[name], STEPS)
    assert other.keys() == reference.keys()
    for key, value in reference.items():
      where = f"{key}: {name} vs 2x4"
      if not np.issubdtype(value.dtype, np.floating):
        np.testing.assert_array_equal(other[key], value, err_msg=where)
      elif "opt_state" in key:
        gap = np.linalg.norm(other[key].astype(np.float64) - value)
        assert gap <= 1e-2 * np.linalg.norm(value.astype(np.float64)) + 1e-5, where
      else:
        # Sums run in another order over 1, 4 + 4 or 8 devices: at most 1e-5 apart after 3
        # steps (2026-12-07), 10x inside.
        np.testing.assert_allclose(other[key], value, rtol=1e-3, atol=1e-4, err_msg=where)



@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, cache_dir, equal_runs):
  """The 2x4 run again, its process 1 SIGKILLed after the first checkpoint, then rerun."""
  del equal_runs  # they run first and fill the compilation cache
  workdir = tmp_path_factory.mktemp("resume") / "run"
  first = Launch(workdir, processes=2, devices=4, cache_dir=cache_dir)
  try:
    pid = _wait_for_pid(first, index=1)
    while not committed_steps(workdir):
      assert first.popen.poll() is None, (
          f"the job ended before its first checkpoint:\n{first.tail()}")
      first.check_time()
      time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    first_code = first.wait()
  finally:
    if first.popen.poll() is None:
      first.kill()
  steps_at_kill = committed_steps(workdir)
  logged_before = metrics(workdir)
  second = run_to_end(Launch(workdir, processes=2, devices=4, cache_dir=cache_dir))
  return dict(first=first, first_code=first_code, steps_at_kill=steps_at_kill,
              logged_before=logged_before, second=second, workdir=workdir)


def _wait_for_pid(launch: Launch, index: int) -> int:
  pattern = re.compile(rf"\[launch\] started process {index} of \d+ \(pid (\d+)\)")
  while True:
    for line in list(launch.lines):
      match = pattern.search(line)
      if match:
        return int(match.group(1))
    assert launch.popen.poll() is None, f"the launcher ended early:\n{launch.tail()}"
    launch.check_time()
    time.sleep(0.05)


def test_killed_process_makes_the_other_exit_in_bounded_time(killed_and_resumed):
  first = killed_and_resumed["first"]
  assert killed_and_resumed["first_code"] != 0
  assert "error: process 1 of 2 was killed by SIGKILL" in first.output, first.tail()
  # Process 0 must have left by itself (not been stopped by the launcher), non-zero, in time.
  match = re.search(r"\[launch\] process 0 (.+) by itself, ([\d.]+) s after process 1 failed",
                    first.output)
  assert match, f"process 0 did not exit by itself:\n{first.tail()}"
  how, seconds = match.group(1), float(match.group(2))
  assert how != "exited with status 0", first.tail()
  assert seconds <= DEAD_PEER_BOUND_S, f"process 0 needed {seconds} s to notice the dead peer"
  # The survivor's log says the peer is gone: the collective it was in lost its
  # connection or got a message cut short by the kill (Gloo), or JAX's coordination
  # service missed the heartbeats.
  survivor = "\n".join(line for line in first.lines if line.startswith("[p0]"))
  assert re.search(r"Connection (reset|closed) by peer|Received data size doesn't match|"
                   r"another task died|stopped sending heartbeats", survivor), first.tail()


def test_rerun_resumes_from_the_last_checkpoint_and_finishes(killed_and_resumed, equal_runs):
  steps_at_kill = killed_and_resumed["steps_at_kill"]
  assert steps_at_kill and steps_at_kill[-1] < STEPS, "the kill did not land mid-run"
  resumed_from = steps_at_kill[-1]
  second = killed_and_resumed["second"]
  for process in (0, 1):
    assert re.search(rf"\[p{process}\].*Resumed from the checkpoint at step {resumed_from}\.",
                     second.output), second.tail()
  workdir = killed_and_resumed["workdir"]
  records = metrics(workdir)
  # The resume rewrote the rows past its checkpoint, so each step is there once; steps
  # that both runs logged were computed from the same state and batches.
  steps = [m["step"] for m in records]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps
  before = {m["step"]: m for m in killed_and_resumed["logged_before"]}
  for m in records:
    if m["step"] > resumed_from and m["step"] in before:
      np.testing.assert_allclose(m["loss"], before[m["step"]]["loss"], rtol=1e-6,
                                 err_msg=f"step {m['step']} differs after resuming")
  # And the interrupted run ends exactly where the uninterrupted one did.
  uninterrupted = final_state(equal_runs["2x4"], STEPS)
  resumed = final_state(workdir, STEPS)
  assert resumed.keys() == uninterrupted.keys()
  for key, value in uninterrupted.items():
    np.testing.assert_allclose(resumed[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
