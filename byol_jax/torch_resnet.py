"""A plain-PyTorch ResNet that loads `byol_jax.export`'s torchvision-layout files.

For width 1 the exported state dict loads straight into
`torchvision.models.resnet18/34/50/101/152` (see `export.to_torchvision`). This
module exists for everything torchvision's constructors cannot build without
subclassing, and for environments without torchvision:

* width multipliers > 1 in the BYOL/SimCLR sense (every channel count times w,
  stem included), which torchvision's hard-coded 64-channel stem cannot express;
* the CIFAR stem (3x3 stride-1 conv1, no max-pool);
* depth 200 (torchvision has the block layout but no `resnet200` constructor).

The module tree and parameter names are torchvision's (`conv1`, `bn1`,
`layer1.0.conv1`, `layer2.0.downsample.0`, ...): with `width=1` and
`stem="imagenet"` a model built here and a torchvision ResNet have identical
state-dict keys and shapes. Only this module imports torch; `export.py` does not.
"""

import json
from typing import Callable, List, Optional, Sequence, Type, Union

import torch
from torch import nn

# depth -> (block class name, blocks per stage); the same table as `resnet.ARCHITECTURES`,
# repeated here so that this file works without importing JAX.
_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

NormLayer = Callable[[int], nn.Module]


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  # Symmetric padding kernel // 2, no bias: what the Haiku encoder uses.
  return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; the stride is on the first (torchvision's BasicBlock)."""

  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 3, stride)
    self.bn1 = norm_layer(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv(planes, planes, 3)
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
               downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 1)
    self.bn1 = norm_layer(planes)
    self.conv2 = _conv(planes, planes, 3, stride)
    self.bn2 = norm_layer(planes)
    self.conv3 = _conv(planes, planes * self.expansion, 1)
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


class ResNet(nn.Module):
  """torchvision's ResNet module tree, plus a width multiplier and a CIFAR stem.

  `fc` is an `nn.Identity` when `num_classes` is 0 (the default): the export has
  no classifier, so the model then returns the pooled embedding and a strict
  `load_state_dict` of the export succeeds.
  """

  def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], *,
               width: int = 1, stem: str = "imagenet",
               norm_layer: Optional[NormLayer] = None, num_classes: int = 0,
               base_channels: int = 64):
    super().__init__()
    if stem not in ("imagenet", "cifar"):
      raise ValueError(f"Unknown stem {stem!r}; use 'imagenet' or 'cifar'.")
    self._norm_layer = norm_layer or nn.BatchNorm2d
    c0 = base_channels * width  # 64 in every standard ResNet
    self.inplanes = c0
    imagenet = stem == "imagenet"
    self.conv1 = _conv(3, self.inplanes, 7, 2) if imagenet else _conv(3, self.inplanes, 3, 1)
    self.bn1 = self._norm_layer(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if imagenet else nn.Identity()
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
      downsample = nn.Sequential(_conv(self.inplanes, planes * block.expansion, 1, stride),
                                 self._norm_layer(planes * block.expansion))
    layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, self._norm_layer)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def group_norm(channels: int) -> nn.GroupNorm:
  """The norm layer of `norm="group_ws"` exports (32 groups, as in the Haiku encoder)."""
  return nn.GroupNorm(min(32, channels), channels, eps=1e-5)


def resnet(depth: int, *, width: int = 1, stem: str = "imagenet", norm: str = "batch",
           num_classes: int = 0, base_channels: int = 64) -> ResNet:
  """The torch twin of `byol_jax.resnet.ResNet(depth, width, stem, norm)`.

  For `norm="group_ws"` the convolutions are plain: the export has already folded
  weight standardisation into the kernels, which is exact for inference. Fine-tuning
  such a model in torch trains it without WS, i.e. not as it was pre-trained.
  """
  if depth not in _LAYOUTS:
    raise ValueError(f"ResNet depth {depth} is not supported; use one of {sorted(_LAYOUTS)}.")
  if norm not in ("batch", "group_ws"):
    raise ValueError(f"Unknown norm {norm!r}; use 'batch' or 'group_ws'.")
  kind, layers = _LAYOUTS[depth]
  block = BasicBlock if kind == "basic" else Bottleneck
  return ResNet(block, layers, width=width, stem=stem, num_classes=num_classes,
                norm_layer=group_norm if norm == "group_ws" else nn.BatchNorm2d,
                base_channels=base_channels)


def projector(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
  """BYOL's projector as exported under `projector.*`: Linear, BatchNorm1d, ReLU, Linear."""
  return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden, eps=1e-5),
                       nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


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
    model = resnet(int(meta["depth"]), width=int(meta["width"]), stem=meta["stem"],
                   norm=meta["norm"], base_channels=int(meta.get("base_channels", 64)))
  except KeyError as e:
    raise ValueError(f"{path} has no {e.args[0]!r} metadata; it was not written by "
                     "byol_jax.export.save_torchvision_safetensors.") from None
  tensors = load_file(path)
  if "projector.0.weight" in tensors:
    hidden, in_features = tensors["projector.0.weight"].shape
    model.projector = projector(in_features, hidden, tensors["projector.3.weight"].shape[0])
  model.load_state_dict(tensors, strict=True)
  model.byol_metadata = {k: (json.loads(v) if k in ("input_mean", "input_std") else v)
                         for k, v in meta.items()}
  return model.eval()
