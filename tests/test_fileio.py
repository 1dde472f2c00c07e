"""Workdir file I/O, locally and through a tf.io.gfile scheme (TensorFlow's ram://); gs:// is
tested against a real server in test_gcs.py."""

import os

import numpy as np
import pytest

from byol_jax import fileio, reporting
from byol_jax.interop import export


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  return f"ram://byol_jax_test_{os.getpid()}_{id(tmp_path)}"


def test_write_append_read(root):
  path = os.path.join(root, "sub", "a.txt")
  fileio.makedirs(os.path.join(root, "sub"))
  fileio.write_text(path, "one\n")
  fileio.append_text(path, "two\n")
  assert fileio.read_text(path) == "one\ntwo\n"
  fileio.write_text(path, "replaced")
  assert fileio.read_text(path) == "replaced"
  assert fileio.exists(path) and not fileio.exists(path + ".tmp")


def test_failed_write_keeps_previous_contents(root):
  path = os.path.join(root, "b.txt")
  fileio.makedirs(root)
  fileio.write_text(path, "good")
  with pytest.raises(RuntimeError):
    with fileio.atomic_local_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("writer died")
  assert fileio.read_text(path) == "good"


def test_reporter_and_npz_export_on_remote_scheme(root):
  reporter = reporting.Reporter(os.path.join(root, "run"), total_steps=4, batch_size=2)
  reporter.write(2, {"byol_loss": 3.0, "tau": 0.99})
  reporter.write(4, {"byol_loss": 2.0, "tau": 0.995})
  records = reporting.read_jsonl(reporter.jsonl_path)
  assert [r["byol_loss"] for r in records] == [3.0, 2.0]
  png = reporter.plot()
  assert png.endswith("pretrain_curves.png") and fileio.exists(png)

  flat = {"encoder/conv1/w": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}
  path = os.path.join(root, "export", "encoder.npz")
  export.write_npz(flat, path)
  if root.startswith("ram://"):
    import tensorflow as tf
    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"copy_{os.getpid()}.npz")
    tf.io.gfile.copy(path, local, overwrite=True)
    path = local
  np.testing.assert_array_equal(export.load_npz(path)["encoder/conv1/w"],
                                flat["encoder/conv1/w"])
