"""A plain-PyTorch ResNet that loads `byol_jax.interop.export`'s torchvision-layout files.

For width 1 the exported state dict loads straight into
`torchvision.models.resnet18/34/50/101/152` (see `torchvision_export.to_torchvision`).
This module exists for everything torchvision's constructors cannot build without
subclassing, and for environments without torchvision:

* width multipliers > 1 in the BYOL/SimCLR sense (every channel count times w,
  stem included), which torchvision's hard-coded 64-channel stem cannot express;
* the CIFAR stem (3x3 stride-1 conv1, no max-pool);
* depth 200 (torchvision has the block layout but no `resnet200` constructor);
* `padding="haiku_same"` (DeepMind's released BYOL weights): Haiku's "SAME"
  padding, one pixel more at the bottom/right at stride 2, computed per input size.

The module tree and parameter names are torchvision's (`conv1`, `bn1`,
`layer1.0.conv1`, `layer2.0.downsample.0`, ...). The block layout (block kind and
blocks per stage) is not repeated here: the export writes `byol_jax.model.resnet`'s into
the file's metadata and `load_safetensors` builds from it. Only this module
imports torch; it never imports JAX.
"""

import json
from typing import Callable, List, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from byol_jax.errors import ConfigError

NormLayer = Callable[[int], nn.Module]
# The values `byol_jax.model.resnet` accepts (tests/test_export.py checks they agree).
PADDINGS = ("torchvision", "haiku_same")
NORMS = ("batch", "group_ws")


def _same_pads(size: int, kernel: int, stride: int):
  """Haiku's (and TF's) "SAME": output ceil(size / stride); an odd pixel is padded after."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pad_same(x, kernel: int, stride: int, value: float):
  top, bottom = _same_pads(x.shape[-2], kernel, stride)
  left, right = _same_pads(x.shape[-1], kernel, stride)
  return F.pad(x, (left, right, top, bottom), value=value)


class SameConv2d(nn.Conv2d):
  """A square, unpadded nn.Conv2d that first pads its input as Haiku's "SAME" does."""

  def forward(self, x):
    return super().forward(_pad_same(x, self.kernel_size[0], self.stride[0], 0.0))


class SameMaxPool2d(nn.MaxPool2d):
  """nn.MaxPool2d (int kernel and stride, no padding) after "SAME" padding with -inf."""

  def forward(self, x):
    return super().forward(_pad_same(x, self.kernel_size, self.stride, float("-inf")))


def _check_padding(padding: str) -> None:
  if padding not in PADDINGS:
    raise ConfigError(f"Unknown padding {padding!r}; use one of {PADDINGS}.")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1,
          padding: str = "torchvision") -> nn.Conv2d:
  _check_padding(padding)
  if padding == "haiku_same" and stride > 1:
    return SameConv2d(in_ch, out_ch, kernel, stride=stride, padding=0, bias=False)
  # Symmetric kernel // 2, which is also "SAME" for odd kernels at stride 1.
  return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; the stride is on the first (torchvision's BasicBlock)."""

  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d,
               padding: str = "torchvision"):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 3, stride, padding)
    self.bn1 = norm_layer(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv(planes, planes, 3, 1, padding)
    self.bn2 = norm_layer(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, "ResNet v1.5") -> 1x1 x4 (torchvision's Bottleneck, groups=1)."""

  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d,
               padding: str = "torchvision"):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 1, 1, padding)
    self.bn1 = norm_layer(planes)
    self.conv2 = _conv(planes, planes, 3, stride, padding)
    self.bn2 = norm_layer(planes)
    self.conv3 = _conv(planes, planes * self.expansion, 1, 1, padding)
    self.bn3 = norm_layer(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """torchvision's ResNet module tree, plus a width multiplier, a CIFAR stem and Haiku padding.

  `fc` is an `nn.Identity` when `num_classes` is 0 (the default): the export has
  no classifier, so the model then returns the pooled embedding and a strict
  `load_state_dict` of the export succeeds.
  """

  def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], *,
               width: int = 1, stem: str = "imagenet",
               norm_layer: Optional[NormLayer] = None, num_classes: int = 0,
               base_channels: int = 64, padding: str = "torchvision"):
    super().__init__()
    if stem not in ("imagenet", "cifar"):
      raise ConfigError(f"Unknown stem {stem!r}; use 'imagenet' or 'cifar'.")
    _check_padding(padding)
    self._norm_layer = norm_layer or nn.BatchNorm2d
    self._padding = padding
    c0 = base_channels * width  # 64 in every standard ResNet
    self.inplanes = c0
    if stem == "imagenet":
      self.conv1 = _conv(3, c0, 7, 2, padding)
      self.maxpool = (SameMaxPool2d(kernel_size=3, stride=2) if padding == "haiku_same"
                      else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    else:
      self.conv1 = _conv(3, c0, 3, 1, padding)
      self.maxpool = nn.Identity()
    self.bn1 = self._norm_layer(c0)
    self.relu = nn.ReLU(inplace=True)
    self.layer1 = self._make_layer(block, c0, layers[0], 1)
    self.layer2 = self._make_layer(block, 2 * c0, layers[1], 2)
    self.layer3 = self._make_layer(block, 4 * c0, layers[2], 2)
    self.layer4 = self._make_layer(block, 8 * c0, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.embedding_dim = 8 * c0 * block.expansion
    self.fc = nn.Linear(self.embedding_dim, num_classes) if num_classes else nn.Identity()

  def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      # A 1x1 convolution needs no padding in either mode.
      downsample = nn.Sequential(_conv(self.inplanes, planes * block.expansion, 1, stride),
                                 self._norm_layer(planes * block.expansion))
    kwargs = dict(norm_layer=self._norm_layer, padding=self._padding)
    layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, **kwargs)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, **kwargs) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def group_norm(channels: int) -> nn.GroupNorm:
  """The norm layer of `norm="group_ws"` exports (min(32, C) groups, as the Haiku encoder)."""
  return nn.GroupNorm(min(32, channels), channels, eps=1e-5)


def resnet(block: str, stage_sizes: Sequence[int], *, width: int = 1, stem: str = "imagenet",
           norm: str = "batch", padding: str = "torchvision", num_classes: int = 0,
           base_channels: int = 64) -> ResNet:
  """The torch twin of `byol_jax.model.resnet.ResNet`; `block`, `stage_sizes` as in its
  `ARCHITECTURES` (e.g. "bottleneck", (3, 4, 6, 3) for depth 50).

  For `norm="group_ws"` the convolutions are plain: the export has already folded
  weight standardisation into the kernels, which is exact for inference. Fine-tuning
  such a model in torch trains it without WS, i.e. not as it was pre-trained.
  """
  if block not in BLOCKS:
    raise ConfigError(f"Unknown block {block!r}; use one of {sorted(BLOCKS)}.")
  if norm not in NORMS:
    raise ConfigError(f"Unknown norm {norm!r}; use one of {NORMS}.")
  return ResNet(BLOCKS[block], stage_sizes, width=width, stem=stem, num_classes=num_classes,
                norm_layer=group_norm if norm == "group_ws" else nn.BatchNorm2d,
                base_channels=base_channels, padding=padding)


def projector(in_features: int, hidden: int, out_features: int,
              output_bias: bool = False) -> nn.Sequential:
  """BYOL's projector as exported under `projector.*`: Linear, BatchNorm1d, ReLU, Linear
  (without bias, as byol_jax and the reference build it)."""
  return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden, eps=1e-5),
                       nn.ReLU(inplace=True), nn.Linear(hidden, out_features, bias=output_bias))


def load_safetensors(path: str) -> ResNet:
  """Builds the right model for an `encoder_torchvision.safetensors` file and loads it.

  The architecture comes from the file's metadata. If the file holds the
  projector, it is attached as `model.projector` (call `model.projector(model(x))`).
  The model is returned in eval mode; inputs are NCHW RGB in [0, 1] normalised
  with the metadata's `input_mean` / `input_std` (torchvision's ImageNet values).
  """
  from safetensors import safe_open  # local: only this helper needs the file's metadata
  from safetensors.torch import load_file

  with safe_open(path, framework="pt") as f:
    meta = f.metadata() or {}
  try:
    model = resnet(meta["block"], json.loads(meta["stage_sizes"]), width=int(meta["width"]),
                   stem=meta["stem"], norm=meta["norm"], padding=meta["padding"],
                   base_channels=int(meta["base_channels"]))
  except KeyError as e:
    raise ConfigError(f"{path} has no {e.args[0]!r} metadata; it was not written by "
                      "byol_jax.interop.torchvision_export (format_version 2 or later): export "
                      "again with --job=export.") from None
  tensors = load_file(path)
  if "projector.0.weight" in tensors:
    hidden, in_features = tensors["projector.0.weight"].shape
    model.projector = projector(in_features, hidden, tensors["projector.3.weight"].shape[0],
                                output_bias="projector.3.bias" in tensors)
  model.load_state_dict(tensors, strict=True)
  model.byol_metadata = {k: (json.loads(v) if k in ("input_mean", "input_std") else v)
                         for k, v in meta.items()}
  return model.eval()
