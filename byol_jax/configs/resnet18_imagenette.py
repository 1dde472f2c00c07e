"""BYOL ResNet-18 on Imagenette (10 easy ImageNet classes) at 128 px."""

from byol_jax.configs import base


def get_config():
  c = base.get_base_config()
  c.batch_size = 256
  c.epochs = 1000.0
  c.base_tau = 0.99
  c.optimizer.base_lr = 1.0
  c.optimizer.weight_decay = 1e-5
  c.optimizer.eta = 0.02
  c.model.depth = 18
  c.model.stem = "imagenet"
  c.data.source = "tfds"
  c.data.name = "imagenette/full-size-v2"
  c.data.train_split = "train"
  c.data.val_split = "train[:500]"
  c.data.test_split = "validation"
  c.data.image_size = 128
  c.data.eval_crop_fraction = 128 / 146
  c.eval.every_steps = 5000
  c.linear_eval.batch_size = 256
  c.linear_eval.base_lr = 0.1
  c.linear_eval.epochs = 100.0
  return c
