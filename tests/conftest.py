"""Every test process sees 8 simulated CPU devices, so meshes of 1 and 8 devices
can be compared inside one pytest session. XLA reads the flag at first import."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tf.data must not grab the accelerator or all host memory in tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The tests run on CPU devices; JAX need not probe libtpu (installed for --job=compile, whose
# TPU compiler works without it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("BYOL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_cifar10():
  """The real CIFAR-10 JPEGs beside the checkout (see ../shared/data/README.md)."""
  root = SHARED_DATA / "cifar10"
  if not (root / "cifar10_jpeg.zip").exists():
    pytest.skip(f"real CIFAR-10 not found under {root}; set BYOL_SHARED_DATA")
  return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A 4-step pretraining of the shrunk demo (tests/test_main.py's), exported: (workdir,
  config). Shared by the read-out tests (compare, embed, load_encoder)."""
  from byol_jax import jobs  # pylint: disable=g-import-not-at-top
  from tests.test_main import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  config = tiny_config(**{"steps": 4, "eval.batch_size": 128, "data.train_split": "train[:512]",
                          "data.test_split": "test[:256]"})
  jobs.run("pretrain", config, workdir)
  jobs.run("export", config, workdir)
  return workdir, config
