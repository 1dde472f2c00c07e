"""Named configs, override checking and derived fields."""

import math
import os
import subprocess
import sys

import pytest

from byol_jax import config_lib
from byol_jax.configs import base, resnet50_imagenet
from byol_jax.model import resnet
from byol_jax.train import optim

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
    config_lib.load_from_argv(["prog", "--config=resnet50_imagenett"])
  assert "Did you mean resnet50_imagenet" in str(e.value)
  assert "demo" in str(e.value)


def test_unknown_field_suggests_and_lists_fields():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_from_argv(["prog", "--config=demo", "--config.optimizer.base_lrr=0.3"])
  message = str(e.value)
  assert "'optimizer.base_lrr'" in message and "optimizer.base_lr" in message
  assert "weight_decay" in message  # the fields of config.optimizer


def test_known_override_passes_and_is_left_for_absl():
  config, rest = config_lib.load_from_argv(["prog", "--config=demo",
                                            "--config.optimizer.base_lr=0.3"])
  assert config.data.source == "demo"
  assert rest == ["prog", "--config.optimizer.base_lr=0.3"]


def test_finalize_derives_steps_from_epochs():
  c = config_lib.load("resnet18_cifar10")
  f = config_lib.finalize(c, num_train_examples=50_000, num_classes=10)
  assert f.steps == 1000 * 50_000 // 256  # whole batches, as the reference counts
  assert f.warmup_steps == 10 * 50_000 // 256
  assert f.data.num_classes == 10
  c.compute_dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match="compute_dtype"):
    config_lib.finalize(c, 50_000, 10)
  c.compute_dtype = "float64"
  with pytest.raises(config_lib.ConfigError, match="float64' is a parity-check path"):
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


# ---------------------------------------------------------------------------
# DeepMind's released BYOL code (deepmind-research/byol), transcribed.
# ---------------------------------------------------------------------------

IMAGENET_TRAIN = 1_281_167  # dataset.Split.TRAIN_AND_VALID.num_examples: all of train
IMAGENETTE_TRAIN = 9_469     # imagenette/160px-v2 train (README, fast iteration)
# configs/byol.py: _LR_PRESETS, _WD_PRESETS, _EMA_PRESETS.
REFERENCE_PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
                     1000: (0.2, 1.5e-6, 0.996)}
# utils/augmentations.py augment_config, in byol_jax's field names.
REFERENCE_VIEWS = {
    "view1": dict(blur_prob=1.0, solarize_prob=0.0),
    "view2": dict(blur_prob=0.1, solarize_prob=0.2),
}
REFERENCE_VIEW_COMMON = dict(
    flip_prob=0.5, color_jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
    grayscale_prob=0.2, blur_sigma=(0.1, 2.0), solarize_threshold=0.5,
    crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3))  # utils/dataset.py's crop


def _field(config, name):
  for part in name.split("."):
    config = config[part]
  return tuple(config) if isinstance(config, (list, tuple)) else config


def _reference_lr(step, base_lr, batch, warmup, total):
  """utils/schedules.py learning_schedule."""
  scaled = base_lr * batch / 256.0
  if step < warmup:
    return step / warmup * scaled
  k = min(step - warmup, total - warmup)
  return scaled * 0.5 * (1 + math.cos(math.pi * k / (total - warmup)))


def _reference_tau(step, base_ema, total):
  """utils/schedules.py target_ema."""
  return 1.0 - (1.0 - base_ema) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


@pytest.mark.parametrize("epochs", [300, 1000])
def test_resnet50_imagenet_is_the_reference(epochs):
  c = config_lib.finalize(config_lib.load(f"resnet50_imagenet:{epochs}"), IMAGENET_TRAIN, 1000)
  batch = 4096  # main_loop.py's --batch_size default, for pretraining and linear eval
  lr, wd, ema = REFERENCE_PRESETS[epochs]
  expected = {
      "batch_size": batch, "optimizer.base_lr": lr, "optimizer.weight_decay": wd,
      "base_tau": ema, "tau_schedule": "cosine", "optimizer.eta": 1e-3,
      "optimizer.momentum": 0.9,
      "steps": epochs * IMAGENET_TRAIN // batch,          # max_steps
      "warmup_steps": 10 * IMAGENET_TRAIN // batch,       # lr_schedule_config.warmup_steps
      "data.num_train_examples": IMAGENET_TRAIN, "data.train_split": "train",
      "data.test_split": "validation", "data.image_size": 224,
      "data.eval_crop_fraction": 224 / (224 + 32),
      "model.depth": 50, "model.width": 1, "model.stem": "imagenet", "model.norm": "batch",
      "model.projector_hidden": 4096, "model.projection_dim": 256,
      "model.predictor_hidden": 4096, "model.use_predictor": True,
      "model.merge_views_bn": False,
      "model.zero_init_residual": False,  # the paper's setting (byol/README.md)
      # configs/eval.py and eval_experiment.py: SGD, Nesterov, no decay, 80 epochs.
      "linear_eval.epochs": 80, "linear_eval.batch_size": batch, "linear_eval.base_lr": 0.2,
      "linear_eval.momentum": 0.9, "linear_eval.nesterov": True,
      "linear_eval.weight_decay": 0.0, "linear_eval.fine_tune": False,
  }
  for name, value in expected.items():
    assert _field(c, name) == pytest.approx(value), name
  for view, probs in REFERENCE_VIEWS.items():
    for name, value in {**REFERENCE_VIEW_COMMON, **probs}.items():
      assert _field(c.augment[view], name) == pytest.approx(value), (view, name)
  assert base.resolve_augment(c.augment) == base.AUGMENT_STYLES["reference"]
  assert (resnet.BN_DECAY, resnet.BN_EPS) == (0.9, 1e-5)  # bn_config
  lr_fn, tau_fn = optim.schedules(c)
  for step in (0, 1, c.warmup_steps // 2, c.warmup_steps, c.warmup_steps + 1, c.steps // 2,
               c.steps - 1, c.steps):
    assert float(lr_fn(step)) == pytest.approx(
        _reference_lr(step, lr, batch, c.warmup_steps, c.steps), rel=1e-5, abs=1e-7), step
    assert float(tau_fn(step)) == pytest.approx(_reference_tau(step, ema, c.steps), abs=1e-6)


def test_resnet18_imagenette_is_the_readme_fast_iteration_setup():
  c = config_lib.finalize(config_lib.load("resnet18_imagenette"), IMAGENETTE_TRAIN, 10)
  _, _, ema = REFERENCE_PRESETS[1000]  # "other parameters unchanged"
  expected = {
      "batch_size": 256, "optimizer.base_lr": 2.0, "optimizer.weight_decay": 1e-6,
      "base_tau": ema, "optimizer.eta": 1e-3, "epochs": 1000,
      "steps": 1000 * IMAGENETTE_TRAIN // 256, "warmup_steps": 10 * IMAGENETTE_TRAIN // 256,
      "model.depth": 18, "model.stem": "imagenet", "model.projector_hidden": 4096,
      "model.projection_dim": 256, "model.predictor_hidden": 4096,
      "data.name": "imagenette/160px-v2", "data.image_size": 128,
      "data.eval_crop_fraction": 128 / (128 + 32),
      "linear_eval.batch_size": 256, "linear_eval.base_lr": 0.2, "linear_eval.epochs": 80,
  }
  for name, value in expected.items():
    assert _field(c, name) == pytest.approx(value), name


def test_every_recipe_defaults_to_the_reference_augmentation():
  for name in config_lib.available():
    assert base.resolve_augment(config_lib.load(name).augment) == \
        base.AUGMENT_STYLES["reference"], name


def test_augment_style_switch_and_fields():
  a = base.get_base_config().augment
  a.style = "torchvision"
  assert base.resolve_augment(a) == dict(crop="inception", color="torchvision",
                                         resize="bilinear")
  a.resize = "bicubic"  # an explicit field wins over the style
  assert base.resolve_augment(a)["resize"] == "bicubic"
  a.crop = "random"
  with pytest.raises(config_lib.ConfigError, match=r"augment.crop must be one of .*'inception'"):
    base.resolve_augment(a)
  a.crop, a.style = None, "simclr"
  with pytest.raises(config_lib.ConfigError, match="augment.style must be one of"):
    base.resolve_augment(a)
