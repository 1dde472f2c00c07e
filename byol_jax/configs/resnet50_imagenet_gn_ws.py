"""BYOL without batch statistics: ResNet-50 with GroupNorm + Weight Standardisation.

The paper's follow-up ("BYOL works even without batch statistics") reports 73.9%
linear top-1 with this encoder. Projector and predictor keep their BatchNorm.
"""

from byol_jax.configs import resnet50_imagenet


def get_config(epochs: str = "1000"):
  c = resnet50_imagenet.imagenet_config(int(epochs))
  c.model.norm = "group_ws"
  return c
