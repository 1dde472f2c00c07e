"""A tiny, already-finalised config shared by the core tests.

The training loop derives `steps`, `warmup_steps` and `data.num_classes` at
start-up; these tests build networks and update steps directly, so those
fields are set here by hand.
"""

import numpy as np

from byol_jax.configs import base

IMAGE_SIZE = 16
BATCH = 16
NUM_CLASSES = 4


def tiny_config(**overrides):
  """ResNet-18 (width 1), MLP hidden 32 -> 16, batch 16 of 16x16 images, 4 classes.

  The ImageNet stem (4x down-sampling, so 4x4 into layer1) rather than the CIFAR
  one: on two shared CPU cores it makes an update step about 4x cheaper than
  the CIFAR stem at 16x16 and keeps the suite's runtime in budget.

  `overrides` are dotted config paths, e.g. `tiny_config(**{"model.norm": "group_ws"})`.
  """
  c = base.get_base_config()
  c.batch_size = BATCH
  c.steps = 40
  c.warmup_steps = 0                  # so the very first step already updates the weights
  c.base_tau = 0.99
  # Peak lr 0.2 (base_lr * 16 / 256). LARS moves each weight tensor by about
  # lr * eta of its norm per step, whatever the rate; biases and BN params get
  # plain SGD, and at 0.8 those already drive this batch-16 net (BN over 16
  # values at 1x1 resolution in layers 3-4) into ill-conditioned states where
  # float re-association between 1 and 8 devices grows ~1e3x in one step.
  c.optimizer.base_lr = 3.2
  c.model.update(dict(depth=18, width=1, stem="imagenet", norm="batch",
                      projector_hidden=32, predictor_hidden=32, projection_dim=16))
  c.data.image_size = IMAGE_SIZE
  c.data.num_classes = NUM_CLASSES
  c.data.num_train_examples = 64 * BATCH
  for path, value in overrides.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config field {path!r}")
    node[leaf] = value
  return c


def image_shape(config):
  return (config.data.image_size, config.data.image_size, 3)


def random_batch(config, seed=0):
  """Float [0, 1] views (view2 brighter than view1) and int32 labels, as host arrays."""
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, *image_shape(config))
  view1 = rng.uniform(0.0, 1.0, shape).astype(np.float32)
  view2 = (0.3 + 0.7 * rng.uniform(0.0, 1.0, shape)).astype(np.float32)
  labels = rng.integers(0, config.data.num_classes, config.batch_size).astype(np.int32)
  return dict(view1=view1, view2=view2, label=labels)
