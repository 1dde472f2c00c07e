"""Evaluation across processes: 2 processes x 4 devices (launch/local.py, jax.distributed on
loopback) give the numbers one process with 8 devices gives, with the features sharded over
both processes: the kNN job (the sharded bank, its top-k merge) and the embed job (each
batch gathered, process 0 writing)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from byol_jax import jobs
from tests.test_main import ENV, REPO, TINY

LAUNCHER = os.path.join(REPO, "launch", "local.py")
# tiny_run's splits and batch (conftest.py); the model comes from its checkpoint.
EVAL = {**TINY, "eval.batch_size": 128, "data.train_split": "train[:512]",
        "data.test_split": "test[:256]", "embed.with_projection": True}


def _launch(job: str, workdir: str, pretrained: str):
  overrides = [f"--config.{k}={v}" for k, v in EVAL.items()]
  cmd = [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4",
         "--heartbeat_timeout=20", "--", "--config=demo", f"--workdir={workdir}", f"--job={job}",
         f"--config.linear_eval.pretrained_workdir={pretrained}", *overrides]
  env = {k: v for k, v in ENV.items() if k != "XLA_FLAGS"}
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _in_process(job: str, workdir: str, pretrained: str, config):
  config = config.copy_and_resolve_references()
  for key, value in EVAL.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  config.linear_eval.pretrained_workdir = pretrained
  return jobs.run(job, config, workdir)


@pytest.mark.parametrize("job", ["knn", "embed"])
def test_two_processes_give_one_process_s_numbers(tiny_run, tmp_path, job):
  pretrained, config = tiny_run
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _in_process(job, one, pretrained, config)
  _launch(job, two, pretrained)
  if job == "knn":
    with open(os.path.join(one, "knn_results.json")) as a, \
        open(os.path.join(two, "knn_results.json")) as b:
      want, got = json.load(a), json.load(b)
    assert want["eval/knn_train_examples"] == got["eval/knn_train_examples"] == 512
    for key in ("eval/knn_top1", "eval/knn_top5", "eval/probe_top1", "eval/probe_top5"):
      assert got[key] == want[key], key
    # Reductions over other device groupings: float rounding only.
    assert got["eval/projection_std"] == pytest.approx(want["eval/projection_std"], rel=1e-5)
  else:
    with np.load(os.path.join(one, "embeddings.npz")) as a, \
        np.load(os.path.join(two, "embeddings.npz")) as b:
      assert sorted(a.files) == sorted(b.files)
      for key in a.files:
        if a[key].dtype.kind == "f":  # the same forward on another device split
          np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)
        else:
          np.testing.assert_array_equal(b[key], a[key])
      assert a["embedding"].shape[0] == 256
