"""BYOL ResNet-18 on Imagenette (10 easy ImageNet classes) at 128 px."""

from byol_jax.configs import base


def get_config():
  c = base.get_small_images_config()
  c.epochs = 1000.0
  c.model.stem = "imagenet"
  c.data.source = "tfds"
  c.data.name = "imagenette/full-size-v2"
  c.data.train_split = "train"
  c.data.val_split = "train[:500]"
  c.data.test_split = "validation"
  c.data.image_size = 128
  c.data.eval_crop_fraction = 128 / 146
  c.eval.every_steps = 5000
  return c
