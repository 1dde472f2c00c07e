"""Issue 13: a run is never stuck, never silently lossy, and a user mistake is one line.

The fast half: the loop over a fake update, the workdir lock, config and
workdir checks, jobs on an empty workdir, one CLI run that fails early. The
cases that need real pretraining (kills, damaged checkpoints, divergence,
Ctrl-C, changed settings) are in test_main.py, beside its reference run.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import config_lib, jobs, main, reporting
from byol_jax.data import datasets, input_pipeline
from byol_jax.errors import ConfigError, NonFiniteLossError
from byol_jax.train import checkpoint, loop, parallel, workdir_lock
from tests.test_main import ENV, REPO, tiny_config


# ----------------------------------------------------------------------------
# The loop, over a fake update whose loss at step i is losses[i].
# ----------------------------------------------------------------------------

def run_loop(workdir, losses, *, total, start=0, log=1, save=2, sigterm_at=None, watch=None):
  mesh = parallel.make_mesh(jax.devices()[:1])

  def update(state, batch):
    del batch
    done = int(state) + 1
    if done == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return state + 1, {"loss": jnp.float32(losses[done - 1])}

  reporter = reporting.Reporter(str(workdir), total_steps=total, batch_size=1)
  with checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=10) as ckpt:
    return loop.train(
        jnp.int32(start), update=update, batches=iter(lambda: {"x": np.zeros(1)}, None),
        mesh=mesh, start=start, total=total, every=loop.Every(log, save), reporter=reporter,
        ckpt=ckpt, to_items=lambda s: {"s": {"step": s}}, meta={}, divergence_advice="ADVICE.",
        watch=watch)


def rows(workdir):
  return [r["step"] for r in reporting.read_jsonl(str(workdir / "pretrain_metrics.jsonl"))]


def test_divergence_moves_aside_the_checkpoints_saved_on_the_way_and_says_where_to_resume(
    tmp_path):
  # Step 4's loss is 80 > 10 x (1 + 5.5): saved, but already diverging.
  losses = [6.3, 6.0, 5.5, 80.0, 1e5, math.nan, 1.0, 1.0]
  with pytest.raises(NonFiniteLossError) as e:
    run_loop(tmp_path, losses, total=8)
  message = str(e.value)
  assert message.startswith("The loss became nan at step 6; stopping.")
  assert f"step 4 (loss 80) to {tmp_path / 'checkpoints' / 'diverged-4'}" in message
  assert "A rerun resumes from the checkpoint at step 2. ADVICE." in message
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "diverged-4"]


def test_a_resumed_loop_rewrites_the_rows_past_its_start_and_keeps_the_run_s_lowest_loss(
    tmp_path):
  losses = [1.0, 5.0, 5.0, 5.0, 5.0, 5.0]
  run_loop(tmp_path, losses, total=6, save=3)
  assert rows(tmp_path) == [1, 2, 3, 4, 5, 6]
  # As a kill after step 5 leaves it: step 6 never committed, a row cut short.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  with open(tmp_path / "pretrain_metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')
  run_loop(tmp_path, losses, total=6, start=3, save=3)
  assert rows(tmp_path) == [1, 2, 3, 4, 5, 6]
  meta = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).read_meta(6)
  assert meta["loss"] == checkpoint.loss_record(5.0, 1.0)  # step 1's loss, before the resume


def test_rows_before_a_resume_skip_the_row_a_kill_cut_short(tmp_path):
  """What the collapse watch replays on a resume: whole rows up to the start step only."""
  run_loop(tmp_path, [1.0, 2.0, 3.0, 4.0], total=4, save=4)
  with open(tmp_path / "pretrain_metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')
  reporter = reporting.Reporter(str(tmp_path), total_steps=4, batch_size=1)
  assert [(r["step"], r["loss"]) for r in reporter.rows(until=3)] == [(1, 1.0), (2, 2.0),
                                                                     (3, 3.0)]
  assert [r["step"] for r in reporter.rows(until=9)] == [1, 2, 3, 4]


def test_the_watch_sees_each_reported_row(tmp_path):
  """The collapse watch's hook: every logged row, averaged over its interval, at its step."""
  seen = []
  run_loop(tmp_path, [1.0, 3.0, 5.0, 7.0, 9.0], total=5, log=2, save=5,
           watch=lambda step, metrics: seen.append((step, metrics["loss"])))
  assert seen == [(2, 2.0), (4, 6.0), (5, 9.0)]


def test_sigterm_saves_the_step_and_keeps_its_metrics_row(tmp_path):
  _, last = run_loop(tmp_path, [1.0] * 10, total=10, log=4, save=4, sigterm_at=2)
  assert last["preempted_at_step"] == 2
  assert rows(tmp_path) == [2]
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_ctrl_c_asks_to_stop_and_a_second_one_leaves_at_once():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with loop.preemption_watch() as preempted:
      assert not preempted(1)
      os.kill(os.getpid(), signal.SIGINT)
      assert preempted(1)
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs before this returns
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_ctrl_c_stays_ignored():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with loop.preemption_watch() as preempted:
      os.kill(os.getpid(), signal.SIGINT)
      assert not preempted(1)
  finally:
    signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------
# One run per workdir.
# ----------------------------------------------------------------------------

HOLDER = """
import sys, time
from byol_jax.train import workdir_lock
with workdir_lock.hold(sys.argv[1], "pretrain"):
  print("held", flush=True)
  time.sleep(600)
"""


def test_a_held_workdir_is_refused_and_a_killed_holder_s_lock_taken_over(tmp_path, caplog):
  workdir = tmp_path / "run"
  lock = workdir / workdir_lock.LOCK_NAME
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(main.USER_ERRORS) as e:
      jobs.run("pretrain", tiny_config(), str(workdir))
    assert f"is in use by pid {holder.pid} on host" in str(e.value)
    assert str(lock) in str(e.value)
    assert os.listdir(workdir) == [workdir_lock.LOCK_NAME]  # the refused run wrote nothing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()

  assert lock.exists()  # kill -9 left it
  with caplog.at_level("WARNING"):
    with workdir_lock.hold(str(workdir), "pretrain"):
      assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert any(f"pid {holder.pid}" in r.getMessage() and "no longer running" in r.getMessage()
             for r in caplog.records)
  assert not lock.exists()


@pytest.mark.parametrize("holder, alive", [
    ({"host": "another-host", "pid": 1}, True),         # cannot be checked from here
    ({"pid": os.getpid(), "started": "0"}, False),      # a recycled pid: another start time
])
def test_which_holders_count_as_alive(tmp_path, holder, alive):
  import socket  # pylint: disable=g-import-not-at-top
  holder = {"host": socket.gethostname(), **holder}
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(holder))
  if alive:
    with pytest.raises(ConfigError, match="is in use by pid 1 on host another-host"):
      with workdir_lock.hold(str(tmp_path), "knn"):
        pass
  else:
    with workdir_lock.hold(str(tmp_path), "knn"):
      pass


def test_a_workdir_that_is_a_file_or_unwritable_is_refused_before_anything(tmp_path,
                                                                            monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    jobs.run("pretrain", tiny_config(), str(a_file))
  with pytest.raises(ConfigError, match="Cannot create --workdir .*Not a directory"):
    jobs.run("pretrain", tiny_config(), str(a_file / "run"))
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  if os.access(read_only, os.W_OK):  # root ignores the mode: fail as the kernel would
    def denied(*args):
      raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(workdir_lock.os, "link", denied)
  with pytest.raises(ConfigError, match="Cannot write to --workdir .*Permission denied"):
    jobs.run("pretrain", tiny_config(), str(read_only))
  assert os.listdir(read_only) == []


# ----------------------------------------------------------------------------
# Settings refused before anything runs.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, "batch_size must be positive, got 0; set --config.batch_size"),
    ({"checkpoint.keep": 0}, "checkpoint.keep must be positive, got 0; set "
                             "--config.checkpoint.keep"),
    ({"steps": 0}, "steps is 0, so there is nothing to train; set --config.steps"),
    ({"checkpoint.every_steps": -1}, "checkpoint.every_steps must be >= 0"),
    ({"steps": -1, "epochs": 0.0}, "epochs must be positive, got 0.0; set --config.epochs"),
    ({"profile_steps": (5, 2)}, "profile_steps must be two steps A,B with 1 <= A <= B <= steps"),
    ({"profile_steps": (7, 9)}, "<= steps (8), got (7, 9); e.g. --config.profile_steps=10,12"),
])
def test_finalize_refuses_settings_that_train_nothing_or_lose_the_result(override, message):
  with pytest.raises(ConfigError) as e:
    config_lib.finalize(tiny_config(**override), 3600, 10)
  assert message in str(e.value)
  assert isinstance(e.value, main.USER_ERRORS)


def test_checkpoint_every_0_means_only_at_the_end():
  config = config_lib.finalize(tiny_config(**{"checkpoint.every_steps": 0}), 3600, 10)
  assert [s for s in range(1, config.steps + 1) if loop.itstime(s, 0, config.steps)] == [
      config.steps]


@pytest.mark.parametrize("job", ["linear_eval", "knn", "export"])
def test_evaluation_jobs_on_an_empty_workdir_say_so_and_leave_nothing(tmp_path, job):
  workdir = tmp_path / "empty"
  with pytest.raises(FileNotFoundError, match="No pretraining checkpoint"):
    jobs.run(job, tiny_config(), str(workdir))
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------

def test_a_folder_of_undecodable_files_is_one_line_and_leaves_no_workdir(tmp_path):
  images = tmp_path / "data" / "train" / "cat"
  images.mkdir(parents=True)
  for i in range(3):
    (images / f"{i}.jpg").write_text("<html>Not Found</html>")
  config = tiny_config(**{"data.source": "folder", "data.path": str(tmp_path / "data")})
  with pytest.raises(main.USER_ERRORS, match=r"None of the 3 image files .* can be decoded"):
    jobs.run("pretrain", config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "data" / "train" / "cat"
  folder.mkdir(parents=True)
  for name, value in ((b"ok.png", 10), (b"\xff.png", 200)):  # b"\xff" is no UTF-8
    with open(os.fsencode(folder) + b"/" + name, "wb") as f:
      Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(f, "PNG")
  config = tiny_config(**{"data.source": "folder", "data.path": str(tmp_path / "data")})
  assert datasets.dataset_info(config, "train") == (2, 1)
  batches = input_pipeline.eval_batches(config, "train", batch_size=8, process_index=0,
                                        process_count=1)
  assert sum(int(b["mask"].sum()) for b in batches) == 2


def test_cli_user_error_is_one_line_and_a_config_file_runs_once(tmp_path):
  """Through main: exit 1, one `error:` line, no traceback, nothing in the workdir, and
  the --config file executed once."""
  counter = tmp_path / "executions"
  config_file = tmp_path / "my_config.py"
  config_file.write_text(f"open({str(counter)!r}, 'a').write('x')\n"
                         "from byol_jax.configs.demo import get_config\n")
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "byol_jax.main", f"--config={config_file}", f"--workdir={workdir}",
       "--config.batch_size=0"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: batch_size must be positive, got 0; set --config.batch_size to a value >= 1.")
  assert "Traceback" not in result.stderr
  assert not workdir.exists()
  assert counter.read_text() == "x"


def test_a_benchmark_running_pretraining_in_process_stops_when_it_is_preempted(
    tmp_path, monkeypatch, capsys):
  """benchmarks/cpu_budget_quality.py exits for requeue, keeping the saved checkpoint."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "cpu_budget_quality", os.path.join(REPO, "benchmarks", "cpu_budget_quality.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  monkeypatch.setattr(jobs, "run", lambda *args, **kwargs: {"preempted_at_step": 3})
  with pytest.raises(SystemExit) as e:
    bench.run(["--budget=tiny", "--variants=byol", f"--data={datasets.DEMO_ASSET}"])
  assert e.value.code == main.PREEMPTED_EXIT_CODE
  root = capsys.readouterr().err.split("--workdir=")[1].split(" ")[0]
  assert os.path.isdir(root)  # a temporary root is kept: its checkpoint resumes the run
  shutil.rmtree(root)
