"""Named configs, override checking and derived fields."""

import math
import os
import subprocess
import sys

import pytest

from byol_jax import config_lib
from byol_jax.configs import resnet50_imagenet

REQUIRED = {"resnet50_imagenet", "resnet200x2_imagenet", "resnet50_imagenet_gn_ws",
            "resnet18_cifar10", "resnet18_stl10", "resnet18_imagenette", "custom_folder", "demo"}


def test_every_required_config_exists_and_loads():
  assert REQUIRED <= set(config_lib.available())
  for name in config_lib.available():
    c = config_lib.load(name)
    assert c.batch_size > 0 and c.model.depth in (18, 34, 50, 101, 152, 200), name


def test_paper_values():
  c = config_lib.load("resnet50_imagenet")
  assert (c.batch_size, c.epochs, c.optimizer.base_lr, c.optimizer.weight_decay, c.base_tau,
          c.warmup_epochs) == (4096, 1000, 0.2, 1.5e-6, 0.996, 10)
  assert (c.optimizer.eta, c.optimizer.momentum) == (1e-3, 0.9)
  assert (c.model.projector_hidden, c.model.projection_dim) == (4096, 256)
  assert (c.augment.view1.blur_prob, c.augment.view2.blur_prob) == (1.0, 0.1)
  assert (c.augment.view1.solarize_prob, c.augment.view2.solarize_prob) == (0.0, 0.2)
  assert config_lib.load("resnet50_imagenet_gn_ws").model.norm == "group_ws"
  big = config_lib.load("resnet200x2_imagenet")
  assert (big.model.depth, big.model.width) == (200, 2)


def test_epoch_presets_via_name_argument():
  c = config_lib.load("resnet50_imagenet:300")
  assert (c.epochs, c.optimizer.base_lr, c.optimizer.weight_decay, c.base_tau) == (
      300, 0.3, 1e-6, 0.99)
  assert set(resnet50_imagenet.PRESETS) == {40, 100, 300, 1000}
  with pytest.raises(ValueError, match="No preset for 7 epochs"):
    config_lib.load("resnet50_imagenet:7")


def test_unknown_config_name_lists_what_exists():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.resolve_argv(["prog", "--config=resnet50_imagenett"])
  assert "Did you mean resnet50_imagenet" in str(e.value)
  assert "demo" in str(e.value)


def test_unknown_field_suggests_and_lists_fields():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.resolve_argv(["prog", "--config=demo", "--config.optimizer.base_lrr=0.3"])
  message = str(e.value)
  assert "'optimizer.base_lrr'" in message and "optimizer.base_lr" in message
  assert "weight_decay" in message  # the fields of config.optimizer


def test_known_override_passes_and_name_becomes_path():
  argv = config_lib.resolve_argv(["prog", "--config=demo", "--config.optimizer.base_lr=0.3"])
  assert argv[1].endswith("byol_jax/configs/demo.py")


def test_finalize_derives_steps_from_epochs():
  c = config_lib.load("resnet18_cifar10")
  f = config_lib.finalize(c, num_train_examples=50_000, num_classes=10)
  assert f.steps == math.ceil(1000 * 50_000 / 256)
  assert f.warmup_steps == round(10 * 50_000 / 256)
  assert f.data.num_classes == 10
  c.compute_dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match="compute_dtype"):
    config_lib.finalize(c, 50_000, 10)


@pytest.mark.parametrize("args, expected", [
    (["--config=nope", "--workdir=/tmp/x"], "Unknown config 'nope'"),
    (["--config=demo", "--workdir=/tmp/x", "--config.model.depthh=3"],
     "Unknown config field 'model.depthh'"),
    (["--config=demo"], "Missing --workdir"),
    (["--config=demo", "--workdir=/tmp/x", "--config.batch_size=abc"], "--config.batch_size"),
])
def test_cli_user_errors_are_one_line(args, expected, tmp_path):
  """Every user mistake on the command line ends in a short message and a non-zero exit."""
  result = subprocess.run([sys.executable, "-m", "byol_jax.main", *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(config_lib.CONFIG_DIR.parents[1])})
  assert result.returncode != 0
  assert expected in result.stderr
  assert "Traceback" not in result.stderr
