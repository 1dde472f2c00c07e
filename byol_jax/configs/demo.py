"""The offline demo: a small BYOL run on the embedded CIFAR-10 sample, minutes on a laptop CPU.

It exercises every part of a real run (two-view augmentation, online probe,
kNN evaluation, checkpoints, TensorBoard, curves PNG) on a half-width ResNet-18 at
32 px with a narrow projector. It is a smoke run, not a recipe: accuracy after
a few minutes of CPU is far from converged.
"""

from byol_jax.configs import base


def get_config():
  c = base.get_small_images_config()
  c.batch_size = 64
  c.epochs = 1.0
  c.warmup_epochs = 0.2
  c.model.stem = "cifar"
  c.model.base_channels = 32          # a half-width ResNet-18, so a CPU gets through it
  c.model.projector_hidden = 512
  c.model.predictor_hidden = 512
  c.model.projection_dim = 128
  c.data.source = "demo"
  c.data.train_split = "train"
  c.data.val_split = "train"
  c.data.test_split = "test"
  c.data.image_size = 32
  c.data.eval_crop_fraction = 1.0
  for view in (c.augment.view1, c.augment.view2):
    view.blur_prob = 0.0
  c.eval.every_steps = 0              # evaluate once, at the end
  c.eval.knn_k = 20
  c.checkpoint.every_steps = 10
  c.log_every_steps = 5
  c.linear_eval.epochs = 2.0
  c.linear_eval.batch_size = 64
  return c
