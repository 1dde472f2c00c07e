"""End to end through the runner: every job, resume after a kill, and user errors.

All runs use the demo config (real CIFAR-10 images shipped with the package)
shrunk to a narrow ResNet-18 at 16 px, so a step takes well under a second.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from byol_jax import checkpoint, config_lib, main, reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "batch_size": 16, "steps": 8, "warmup_steps": 2, "log_every_steps": 2,
    "checkpoint.every_steps": 2, "eval.every_steps": -1, "eval.knn_k": 5,
    "data.image_size": 16, "model.base_channels": 8, "model.projector_hidden": 32,
    "model.predictor_hidden": 32, "model.projection_dim": 16,
    "linear_eval.batch_size": 16, "linear_eval.epochs": 0.02,
}


def tiny_config(**extra):
  config = config_lib.load("demo")
  for key, value in {**TINY, **extra}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli(workdir, *args, timeout=300, **extra):
  overrides = [f"--config.{k}={v}" for k, v in {**TINY, **extra}.items()]
  return [sys.executable, "-m", "byol_jax.main", "--config=demo", f"--workdir={workdir}",
          *overrides, *args]


def run_cli(workdir, *args, timeout=300, **extra):
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run(cli(workdir, *args, **extra), capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=REPO)


def final_params(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  meta = ckpt.read_meta(step)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  ckpt.close()
  return step, meta, restored["state"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """One uninterrupted tiny pretraining run, in-process."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  metrics = main.run_job("pretrain", tiny_config(**{"eval.every_steps": 0}), workdir)
  return workdir, metrics


def test_pretrain_writes_metrics_tensorboard_plot_and_checkpoints(pretrained):
  workdir, metrics = pretrained
  records = reporting.read_jsonl(os.path.join(workdir, "pretrain_metrics.jsonl"))
  steps = [r["step"] for r in records if "byol_loss" in r]
  assert steps == [2, 4, 6, 8]
  for key in ("byol_loss", "learning_rate", "tau", "images_per_s", "projection_std"):
    assert key in records[-2] or key in records[-1], key
  assert all(np.isfinite(r["byol_loss"]) for r in records if "byol_loss" in r)
  assert "eval/knn_top1" in metrics and 0.0 <= metrics["eval/knn_top1"] <= 1.0
  assert "eval/probe_top1" in metrics
  assert os.listdir(os.path.join(workdir, "tensorboard", "pretrain"))
  assert os.path.getsize(os.path.join(workdir, "pretrain_curves.png")) > 1000
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [4, 6, 8]  # keep=3


def test_resume_after_kill_matches_uninterrupted_run_bit_for_bit(pretrained, tmp_path):
  """SIGKILL a run after its step-4 checkpoint; rerunning finishes with identical params."""
  reference_dir, _ = pretrained
  workdir = str(tmp_path / "killed")
  env = {**os.environ, "PYTHONPATH": REPO}
  log = open(tmp_path / "killed.log", "w+")
  proc = subprocess.Popen(cli(workdir, **{"eval.every_steps": 0}), env=env, cwd=REPO,
                          stdout=log, stderr=subprocess.STDOUT)
  marker = os.path.join(workdir, "checkpoints", "4")
  deadline = time.time() + 600
  while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.seek(0)
  assert os.path.isdir(marker), "no step-4 checkpoint:\n" + log.read()[-3000:]
  done = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert max(done) < 8, "the run finished before it could be killed"

  result = run_cli(workdir, **{"eval.every_steps": 0})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from the checkpoint at step" in result.stderr
  step_a, _, ref = final_params(reference_dir)
  step_b, _, resumed = final_params(workdir)
  assert step_a == step_b == 8
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_linear_eval_knn_and_export_jobs(pretrained, tmp_path):
  source, _ = pretrained
  config = tiny_config(**{"linear_eval.pretrained_workdir": source})
  workdir = str(tmp_path / "eval")
  best = main.run_job("linear_eval", config, workdir)
  assert 0.0 <= best["test_top1"] <= best["test_top5"] <= 1.0
  saved = json.load(open(os.path.join(workdir, "linear_eval_results.json")))
  assert saved["best"]["test_top1"] == best["test_top1"]

  knn = main.run_job("knn", config, workdir)
  assert 0.0 <= knn["eval/knn_top1"] <= 1.0

  paths = main.run_job("export", config, workdir)
  arrays = np.load(paths["npz"] if "npz" in paths else os.path.join(workdir, "export",
                                                                    "encoder.npz"))
  assert any(k.startswith("encoder/") for k in arrays.files)


def test_fine_tune_on_a_label_subset(pretrained, tmp_path):
  source, _ = pretrained
  config = tiny_config(**{"linear_eval.pretrained_workdir": source,
                          "linear_eval.fine_tune": True, "linear_eval.label_fraction": 0.1,
                          "linear_eval.epochs": 0.2})
  best = main.run_job("linear_eval", config, str(tmp_path))
  assert os.path.exists(tmp_path / "fine_tune_0.1_results.json")
  assert 0.0 <= best["test_top1"] <= 1.0


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  result = run_cli(tmp_path, **{"optimizer.base_lr": 1e30, "checkpoint.every_steps": 1,
                                "log_every_steps": 1})
  assert result.returncode != 0
  assert "The loss became" in result.stderr and "at step" in result.stderr
  assert "Traceback" not in result.stderr
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  failed_at = int(result.stderr.split("at step ")[1].split(";")[0])
  assert max(saved, default=0) < failed_at


def test_checkpoint_from_another_architecture_is_a_clear_error(pretrained, tmp_path):
  source, _ = pretrained
  result = run_cli(source, **{"model.base_channels": 16})
  assert result.returncode != 0
  assert "was written by a different model" in result.stderr
  assert "base_channels=8 there vs 16 here" in result.stderr


@pytest.mark.parametrize("extra, expected", [
    ({"batch_size": 12}, "does not divide evenly over 8 devices"),
    ({"data.source": "folder", "data.path": "/nonexistent/images"}, "/nonexistent/images"),
])
def test_user_errors_exit_nonzero_with_one_line(tmp_path, extra, expected):
  result = run_cli(tmp_path, **extra)
  assert result.returncode != 0
  assert expected in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_knn_without_pretraining_says_what_to_do(tmp_path):
  result = run_cli(tmp_path, "--job=knn")
  assert result.returncode != 0
  assert "No pretraining checkpoint" in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_for_requeue(tmp_path):
  """Preemption: SIGTERM mid-run saves the current step (off the checkpoint schedule), exits 143,
  and the rerun resumes from exactly that step."""
  workdir = str(tmp_path / "preempted")
  extra = {"steps": 400, "checkpoint.every_steps": 1000, "log_every_steps": 1,
           "eval.every_steps": -1}
  proc = subprocess.Popen(cli(workdir, **extra), env={**os.environ, "PYTHONPATH": REPO},
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "pretrain_metrics.jsonl")
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline and not (
      os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == main.PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert "Preempted at step" in stderr
  step = int(stderr.split("Preempted at step ")[1].split(";")[0])
  assert 2 <= step < 400
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert saved == [step]

  result = run_cli(workdir, **{**extra, "steps": step + 2})
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from the checkpoint at step {step}" in result.stderr
