"""BYOL ResNet-18 on CIFAR-10, the recipe behind solo-learn's 92.58% linear top-1.

CIFAR stem (3x3 conv, no max-pool), batch 256, 1000 epochs, LARS lr 1.0 with
eta 0.02, weight decay 1e-5, tau 0.99 -> 1, no Gaussian blur at 32 px. With
`--config.data.source=folder --config.data.path=.../cifar10_jpeg.zip` it trains
on the offline JPEG copy in ../shared/data.
"""

from byol_jax.configs import base


def get_config():
  c = base.get_small_images_config()
  c.epochs = 1000.0
  c.warmup_epochs = 10.0
  c.model.stem = "cifar"
  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.train_split = "train"
  c.data.val_split = "train[:5000]"
  c.data.test_split = "test"
  c.data.image_size = 32
  c.data.eval_crop_fraction = 1.0
  for view in (c.augment.view1, c.augment.view2):
    view.blur_prob = 0.0  # blurring a 32x32 image destroys it; solo-learn turns it off
  c.eval.every_steps = 10_000
  return c
