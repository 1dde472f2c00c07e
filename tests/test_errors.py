"""Issue 29, item 5: a user's mistake is one line; a bug is a traceback that says it is one."""

import subprocess

import ml_collections
import numpy as np
import pytest

import byol_jax
from byol_jax import errors, main
from byol_jax.configs import base, resnet50_imagenet
from byol_jax.data import stream_index
from byol_jax.interop import export, reference_pickle
from byol_jax.model import resnet
from byol_jax.train import parallel
from byol_jax.views import device_crop
from tests.test_main import ENV, REPO, cli


def test_bare_value_and_import_errors_are_not_user_errors():
  assert not issubclass(ValueError, main.USER_ERRORS)
  assert not issubclass(ImportError, main.USER_ERRORS)
  assert not issubclass(KeyError, main.USER_ERRORS)


def _bad_pickle(tmp_path):
  path = tmp_path / "not_byol.pkl"
  path.write_bytes(b"not a pickle at all")
  return reference_pickle.load(str(path))


def _export_projector_without_head_norm(tmp_path):
  config = base.get_base_config()
  config.model.head_norm = False
  config.export.include_projector = True
  return export.run_export({}, {}, config, str(tmp_path))


# Each documented mistake the checks below the jobs catch: its error is a user error.
MISTAKES = {
    "model.depth": (lambda _: resnet.check_architecture(26, 1, "imagenet", "batch",
                                                        "torchvision"), "model.depth"),
    "batch over devices": (lambda _: parallel.check_batch_size(12, parallel.make_mesh()),
                           "--config.batch_size="),
    "batch over processes": (lambda _: stream_index.local_batch_size(10, 3), "multiple of 3"),
    "label_fraction": (lambda _: stream_index.class_balanced_subset(np.zeros(4, int), 2.0, 0),
                       "label_fraction"),
    "eval_crop_fraction": (lambda _: stream_index.eval_crop_fraction(ml_collections.ConfigDict(
        {"data": {"eval_crop_fraction": 0.0}})), "data.eval_crop_fraction"),
    "imagenet preset": (lambda _: resnet50_imagenet.imagenet_config(7), "No preset for 7"),
    "augment.crop": (lambda _: device_crop.random_views(np.zeros((1, 4, 4, 3), np.uint8), None,
                                                       None, 2, crop="square"), "augment.crop"),
    "import_path": (_bad_pickle, "not_byol.pkl"),
    "export.include_projector": (_export_projector_without_head_norm, "include_projector=False"),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_each_documented_mistake_is_a_user_error(name, tmp_path):
  make, says = MISTAKES[name]
  with pytest.raises(main.USER_ERRORS) as e:
    make(tmp_path)
  assert says in str(e.value) and "\n" not in str(e.value)


# `python -c PLANT KIND <main's arguments>`: main, with the job replaced by one that raises.
PLANT = r"""
import sys
from byol_jax import errors, jobs, main
kind = sys.argv.pop(1)
def run(*args, **kwargs):
  if kind == "bug":
    raise ValueError("planted internal error")
  raise errors.ConfigError("planted user mistake; fix it like this.")
jobs.run = run
main.main()
"""


def test_a_planted_internal_value_error_shows_its_traceback_and_says_it_is_a_bug(tmp_path):
  args = cli(tmp_path / "run")
  proc = subprocess.run([args[0], "-c", PLANT, "bug", *args[3:]], env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert "ValueError: planted internal error" in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: this is a bug in byol_jax {byol_jax.__version__}")
  assert "--config=demo" in last and f"--workdir={tmp_path / 'run'}" in last


def test_a_planted_user_mistake_is_one_line(tmp_path):
  args = cli(tmp_path / "run")
  proc = subprocess.run([args[0], "-c", PLANT, "mistake", *args[3:]], env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == "error: planted user mistake; fix it like this."
  assert "Traceback" not in proc.stderr and "bug in byol_jax" not in proc.stderr


def test_errors_module_classes_are_the_ones_main_prints():
  for cls in (errors.ConfigError, errors.DataSourceError, errors.MissingDependencyError,
              errors.StorageError, errors.NonFiniteLossError):
    assert issubclass(cls, main.USER_ERRORS)
