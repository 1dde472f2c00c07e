"""BYOL ResNet-200 (2x width) on ImageNet: the paper's largest model (79.6% linear top-1)."""

from byol_jax.configs import resnet50_imagenet


def get_config(epochs: str = "1000"):
  c = resnet50_imagenet.imagenet_config(int(epochs))
  c.model.depth = 200
  c.model.width = 2
  c.compute_dtype = "bfloat16"  # 250M parameters: bf16 compute is what makes it practical
  # Without it a v4 chip (32 GiB) holds the step at 64 per chip with 11% to spare; with it,
  # the same math (experiments/tpu_scale.md).
  c.model.remat = True
  return c
