"""BYOL ResNet-18 on STL-10: pretrain on the 100k unlabelled images at 96 px."""

from byol_jax.configs import base


def get_config():
  c = base.get_small_images_config()
  c.epochs = 400.0
  c.model.stem = "imagenet"
  c.data.source = "tfds"
  c.data.name = "stl10"
  c.data.train_split = "unlabelled"   # linear evaluation trains on "train"
  c.data.val_split = "train[:500]"
  c.data.test_split = "test"
  c.data.image_size = 96
  c.data.eval_crop_fraction = 1.0
  c.eval.every_steps = 5000
  return c
