"""The encoder (and optionally the projector) as a torchvision ResNet state dict.

The Haiku encoder's module names already follow torchvision (see `resnet.py`),
so the state dict is the Haiku tree renamed by one table (`_RENAMES`), plus
layout changes: conv HWIO -> OIHW, linear [in, out] -> [out, in], norm
`[1, .., C]` -> `[C]`. Which modules and shapes to expect comes from the Haiku
network itself (`jax.eval_shape` of its init), never from a re-derivation.
"""

import json
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from byol_jax import fileio
from byol_jax.model import networks, resnet
from byol_jax.model.networks import IMAGE_MEAN, IMAGE_STD

ENCODER = "encoder"
PROJECTOR = "projector"
FORMAT_VERSION = "2"  # 2: block layout and padding in the metadata
# The model config fields that shape the encoder.
ENCODER_FIELDS = ("depth", "width", "base_channels", "stem", "norm", "padding")

# Haiku module path -> torchvision key prefix, applied in order ("/" becomes "." last).
_RENAMES = (
    (r"^projector/linear1$", "projector/0"),  # nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)
    (r"^projector/bn$", "projector/1"),
    (r"^projector/linear2$", "projector/3"),
    (r"^encoder/", ""),
    (r"/(bn|gn)$", ""),                        # resnet.Norm's inner hk.BatchNorm / GroupNorm
    (r"^layer(\d)_(\d+)", r"layer\1/\2"),
    (r"/downsample_conv$", "/downsample/0"),
    (r"/downsample_norm$", "/downsample/1"),
)


def torch_prefix(module: str) -> str:
  """e.g. "encoder/layer2_0/downsample_norm/bn" -> "layer2.0.downsample.1"."""
  for pattern, replacement in _RENAMES:
    module = re.sub(pattern, replacement, module)
  return module.replace("/", ".")


# --------------------------------------------------------------------------- #
# Reading Haiku trees (shared with export.py)
# --------------------------------------------------------------------------- #


def host_array(x, name: str) -> np.ndarray:
  """Host copy of one leaf, also for replicated arrays of a multi-process run.

  A parameter replicated over every device of several processes is not fully
  addressable, so `np.asarray` refuses it; any local shard is the whole value.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError(f"{name} is sharded across processes; gather it (e.g. "
                       "jax.experimental.multihost_utils.process_allgather) before exporting.")
    x = x.addressable_shards[0].data
  return np.asarray(x)


def leaf(tree: Mapping[str, Mapping[str, Any]], module: str, name: str, what: str) -> np.ndarray:
  try:
    value = tree[module][name]
  except KeyError:
    raise ValueError(f"The {what} have no {module}/{name}. Pass the online network's "
                     f"{what} from the checkpoint, and the model config it was trained "
                     "with.") from None
  return host_array(value, f"{module}/{name}")


def modules_under(tree: Mapping[str, Any], prefix: str) -> List[str]:
  return sorted(m for m in tree if m == prefix or m.startswith(prefix + "/"))


def check_has_modules(params, prefixes: Sequence[str]) -> None:
  for prefix in prefixes:
    if not modules_under(params, prefix):
      hint = (" or export with include_projector=False (config.export.include_projector)"
              if prefix == PROJECTOR else "")
      raise ValueError(f"params have no '{prefix}' modules: pass the online network's "
                       f"params (the checkpoint's online params){hint}.")


# --------------------------------------------------------------------------- #
# The network's own shapes
# --------------------------------------------------------------------------- #


def expected_shapes(model_config, prefixes: Sequence[str]) -> Tuple[dict, dict]:
  """(params, state) shapes of the encoder (and projector) that `model_config` builds.

  Building the network runs `resnet.ResNet`'s checks of the config.
  """
  target = networks.make_networks(model_config, num_classes=1).target
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params, state = jax.eval_shape(lambda x: target.init(jax.random.PRNGKey(0), x, True), images)
  keep = lambda tree: {m: dict(v) for m, v in tree.items() if m.split("/")[0] in prefixes}
  return keep(params), keep(state)


def _describe(model_config) -> str:
  return ", ".join(f"{f}={model_config[f]!r}" for f in ENCODER_FIELDS)


def _check_params(params, expected: dict, prefixes: Sequence[str], model_config) -> None:
  """The params must hold exactly the modules and shapes the config implies."""
  hint = "Export with the `model` config the checkpoint was trained with."
  found = {m for prefix in prefixes for m in modules_under(params, prefix)}
  if found != set(expected):
    missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
    more = lambda names: f"{names[:4]}{'...' if len(names) > 4 else ''}"
    raise ValueError(f"The params do not match model config ({_describe(model_config)}): "
                     f"missing {more(missing)}, unexpected {more(unexpected)}. {hint}")
  for module, leaves in expected.items():
    for name, shape_dtype in leaves.items():
      shape = tuple(np.shape(leaf(params, module, name, "params")))
      if shape != shape_dtype.shape:
        raise ValueError(f"{module}/{name} has shape {shape}, but the model config implies "
                         f"{shape_dtype.shape}. {hint}")


# --------------------------------------------------------------------------- #
# Layout changes
# --------------------------------------------------------------------------- #


def _flat(a) -> np.ndarray:
  return np.ascontiguousarray(np.reshape(a, -1), dtype=np.float32)


def _conv_weight(params, module: str, weight_standardised: bool) -> np.ndarray:
  """HWIO kernel -> torch OIHW, with weight standardisation folded in if the model used it."""
  w = leaf(params, module, "w", "params").astype(np.float64)
  if weight_standardised:
    # Exactly what resnet.Conv2D(standardize=True) computes at every forward: per output channel,
    # over (H, W, I), population variance. In float64 so folding adds no error.
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    w = (w - mean) / np.sqrt(var + resnet.WS_EPS)
  return np.ascontiguousarray(w.transpose(3, 2, 0, 1), dtype=np.float32)


def _norm(params, state, module: str, prefix: str, batch: bool) -> Dict[str, np.ndarray]:
  """Haiku BatchNorm (params + EMA states) or GroupNorm -> torch norm entries.

  Haiku's moving variance is the EMA of the biased batch variance while torch
  would have tracked the unbiased one; in eval mode both layers compute
  (x - mean) / sqrt(var + eps) * weight + bias, so exporting Haiku's value as
  `running_var` reproduces Haiku's eval outputs exactly.
  """
  out = {f"{prefix}.weight": _flat(leaf(params, module, "scale", "params")),
         f"{prefix}.bias": _flat(leaf(params, module, "offset", "params"))}
  if batch:
    out[f"{prefix}.running_mean"] = _flat(leaf(state, f"{module}/~/mean_ema", "average", "state"))
    out[f"{prefix}.running_var"] = _flat(leaf(state, f"{module}/~/var_ema", "average", "state"))
    # The EMA's update counter is the number of training-mode batches seen.
    counter = leaf(state, f"{module}/~/mean_ema", "counter", "state")
    out[f"{prefix}.num_batches_tracked"] = np.asarray(counter, dtype=np.int64).reshape(())
  return out


def to_torchvision(params, state, model_config, *,
                   include_projector: bool = False) -> Dict[str, np.ndarray]:
  """The encoder as a torchvision ResNet state dict of numpy arrays.

  Keys and layouts are torchvision's: `conv1.weight` (OIHW), `bn1.weight`,
  `bn1.bias`, `bn1.running_mean`, `bn1.running_var`, `bn1.num_batches_tracked`,
  `layer1.0.conv1.weight`, ..., `layer2.0.downsample.0.weight` (1x1 conv),
  `layer2.0.downsample.1.*` (its norm). Loading it into a torch model:

  * There are no `fc.*` keys (BYOL trains no classifier). Set
    `model.fc = nn.Identity()` and load with `strict=True` (the model then
    returns the pooled embedding), or keep `fc` and load with `strict=False`.
  * Width 1, ImageNet stem, BatchNorm, torchvision padding:
    `torchvision.models.resnet{18,34,50,101,152}()` (weights=None) as is. Depth 200
    has no torchvision constructor; build
    `torchvision.models.resnet.ResNet(Bottleneck, [3, 24, 36, 3])`.
  * CIFAR stem (`model.stem="cifar"`): conv1 is 3x3 stride 1 and there is no
    max-pool. Before loading, set
    `model.conv1 = nn.Conv2d(3, 64 * w, 3, 1, 1, bias=False)` and
    `model.maxpool = nn.Identity()`.
  * Width w > 1: our w multiplies *every* channel count, the 64-channel stem and
    the block outputs included (conv1 has 64w channels, stage i has inner width
    64w*2^i and output 64w*2^i*expansion, the embedding is 512w*expansion), as in
    the BYOL/SimCLR "ResNet-50 (2x)". That is NOT torchvision's
    `wide_resnet50_2`, which widens only the bottleneck's inner 3x3; its shapes
    do not match. Use `byol_jax.torch_resnet.load_safetensors(path)` (or
    `torch_resnet.resnet(...)`), which has torchvision's module names.
  * `model.padding="haiku_same"` (e.g. DeepMind's released weights): the stride-2
    convolutions and the max-pool pad as Haiku's "SAME" (one pixel more at the
    bottom/right for even sizes). torchvision's modules pad symmetrically, so they
    load these weights but compute slightly different features; use
    `torch_resnet.load_safetensors`, whose modules pad as Haiku does.
  * GroupNorm + weight standardisation (`model.norm="group_ws"`): the
    standardisation is folded into the exported conv weights (exact for
    inference), so the torch convolutions are plain `nn.Conv2d`. The GroupNorm
    affine parameters are exported under the same `bn*` / `downsample.1` keys,
    as `.weight` / `.bias` only. Build the model with
    `norm_layer=torch_resnet.group_norm` (min(32, C) groups, eps 1e-5).
    Fine-tuning it in torch trains it without weight standardisation.

  Inputs are NCHW RGB in [0, 1], normalised with torchvision's ImageNet mean/std
  (`networks.IMAGE_MEAN` / `IMAGE_STD`), exactly as in training.

  With `include_projector=True`, the projector is added as `projector.0.*`
  (Linear), `projector.1.*` (BatchNorm1d), `projector.3.weight` (Linear without
  bias), matching `model.projector = torch_resnet.projector(...)`.
  """
  prefixes = (ENCODER, PROJECTOR) if include_projector else (ENCODER,)
  check_has_modules(params, prefixes)
  expected_params, expected_state = expected_shapes(model_config, prefixes)
  _check_params(params, expected_params, prefixes, model_config)
  state = state or {}
  if expected_state and not modules_under(state, ENCODER):
    raise ValueError("The state has no encoder BatchNorm statistics: pass the network state "
                     "(the checkpoint's online state) along with the params.")
  weight_standardised = model_config["norm"] == "group_ws"
  out = {}
  for module, leaves in expected_params.items():
    prefix = torch_prefix(module)
    if "w" in leaves and len(leaves["w"].shape) == 4:
      out[f"{prefix}.weight"] = _conv_weight(params, module, weight_standardised)
    elif "w" in leaves:  # Haiku [in, out]; torch [out, in]
      out[f"{prefix}.weight"] = np.ascontiguousarray(leaf(params, module, "w", "params").T,
                                                     dtype=np.float32)
      if "b" in leaves:
        out[f"{prefix}.bias"] = _flat(leaf(params, module, "b", "params"))
    else:
      batch = f"{module}/~/mean_ema" in expected_state
      out.update(_norm(params, state, module, prefix, batch))
  return out


# --------------------------------------------------------------------------- #
# The file
# --------------------------------------------------------------------------- #


def architecture_name(model_config) -> str:
  """"resnet50", "resnet50_2x" for width 2 (our all-channel multiplier, not wide_resnet),
  "resnet18_base32" for a narrow demo net."""
  name = f"resnet{model_config.depth}"
  if model_config.width != 1:
    name += f"_{model_config.width}x"
  if model_config["base_channels"] != 64:
    name += f"_base{model_config['base_channels']}"
  return name


def embedding_dim(model_config) -> int:
  return resnet.embedding_dim(model_config.depth, model_config.width,
                              model_config["base_channels"])


def torchvision_metadata(model_config, *, include_projector: bool = False) -> Dict[str, str]:
  """safetensors metadata (a str -> str mapping): all `torch_resnet` needs to rebuild the model."""
  m = {f: model_config[f] for f in ENCODER_FIELDS}
  resnet.check_architecture(m["depth"], m["width"], m["stem"], m["norm"], m["padding"],
                            m["base_channels"])
  block, stage_sizes = resnet.ARCHITECTURES[m["depth"]]
  return {
      "format": "byol_jax.torchvision_resnet",
      "format_version": FORMAT_VERSION,
      "architecture": architecture_name(model_config),
      **{k: str(v) for k, v in m.items()},
      "block": block,
      "stage_sizes": json.dumps(list(stage_sizes)),
      "torch_norm_layer": ("BatchNorm2d(eps=1e-5)" if m["norm"] == "batch" else
                           "GroupNorm(min(32, C), C, eps=1e-5); conv weights are "
                           "pre-standardised"),
      "embedding_dim": str(embedding_dim(model_config)),
      "includes_projector": str(bool(include_projector)).lower(),
      "input_layout": "NCHW RGB, scaled to [0, 1], then (x - input_mean) / input_std",
      "input_mean": json.dumps(list(IMAGE_MEAN)),
      "input_std": json.dumps(list(IMAGE_STD)),
  }


def save_torchvision_safetensors(params, state, model_config, path: str, *,
                                 include_projector: bool = False) -> str:
  """Writes `to_torchvision(...)` as a .safetensors file (atomically); returns `path`.

  Load with `byol_jax.torch_resnet.load_safetensors(path)`, which reads the
  metadata, or `safetensors.torch.load_file(path)` and `model.load_state_dict(...)`
  (see `to_torchvision` for building the model).
  """
  metadata = torchvision_metadata(model_config, include_projector=include_projector)
  tensors = to_torchvision(params, state, model_config, include_projector=include_projector)
  with fileio.atomic_local_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
  return path
