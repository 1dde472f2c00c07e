"""BYOL ResNet-18 on Imagenette at 128 px: the reference README's fast-iteration setup.

DeepMind's byol/README.md ("Setup for fast iteration"): imagenette/160px-v2 at
128 px (every 224 of the ImageNet pipeline replaced by 128, so the evaluation
crop is 128/160 of the short side), ResNet-18, weight decay 1e-6, base lr 2.0
(x batch/256), batch 256, 1000 epochs, every other hyper-parameter as the
1000-epoch ImageNet preset (tau 0.996, LARS eta 1e-3, 10 warm-up epochs,
4096-4096-256 heads). The README reports ~92.3% top-1 for the online
classifier after ~4 h on one V100.
"""

from byol_jax.configs import resnet50_imagenet


def get_config():
  c = resnet50_imagenet.imagenet_config(1000)
  c.batch_size = 256
  c.optimizer.base_lr = 2.0
  c.optimizer.weight_decay = 1e-6
  c.model.depth = 18
  c.data.name = "imagenette/160px-v2"
  c.data.train_split = "train"
  c.data.val_split = "train[:500]"
  c.data.test_split = "validation"
  c.data.image_size = 128
  c.data.eval_crop_fraction = 128 / (128 + 32)
  c.linear_eval.batch_size = 256   # the reference's eval config at --batch_size=256
  c.eval.every_steps = 5000
  return c
