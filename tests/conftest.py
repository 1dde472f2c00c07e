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
