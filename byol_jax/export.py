"""Export of a trained BYOL encoder (and optionally its projector).

Two formats, both pickle-free:

* `encoder.npz` (`export_npz`): the Haiku parameters and BatchNorm moving
  statistics as a flat mapping `"<haiku module path>/<name>" -> float32 array`,
  e.g. `encoder/conv1/w` (HWIO), `encoder/bn1/bn/scale`, `encoder/bn1/bn/offset`,
  `encoder/bn1/bn/mean`, `encoder/bn1/bn/var`. Arrays keep their Haiku shapes
  (BatchNorm parameters and statistics are `[1, 1, 1, C]` in the encoder and
  `[1, C]` in the projector), so splitting a key at its last "/" rebuilds the
  Haiku params tree.
* `encoder_torchvision.safetensors` (`save_torchvision_safetensors`): the encoder
  as a `torchvision.models.resnet*` state dict (`to_torchvision`), with the
  architecture and the input normalisation in the file's metadata.

`run_export` writes both plus an `export.json` that describes them. The
encoder's module names already follow torchvision (see `resnet.py`), so the
torch export is a renaming plus layout changes (conv HWIO -> OIHW, linear
[in, out] -> [out, in], BatchNorm `[1, .., C]` -> `[C]`).
"""

import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Tuple

import jax
import numpy as np
import safetensors.numpy

from byol_jax import fileio, resnet
from byol_jax.train_step import IMAGE_MEAN, IMAGE_STD

ENCODER = "encoder"
PROJECTOR = "projector"
NPZ_NAME = "encoder.npz"
SAFETENSORS_NAME = "encoder_torchvision.safetensors"
JSON_NAME = "export.json"
FORMAT_VERSION = "1"

# Must match `resnet.WSConv2D`: the epsilon of its per-output-channel variance.
WS_EPS = 1e-10


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _to_numpy(x, name: str) -> np.ndarray:
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


def _leaf(tree: Mapping[str, Mapping[str, Any]], module: str, name: str, what: str) -> np.ndarray:
  try:
    value = tree[module][name]
  except KeyError:
    raise ValueError(f"The {what} have no {module}/{name}. Pass the online network's "
                     f"{what} from the checkpoint, and the model config it was trained "
                     "with.") from None
  return _to_numpy(value, f"{module}/{name}")


def _modules_under(tree: Mapping[str, Any], prefix: str) -> List[str]:
  return sorted(m for m in tree if m == prefix or m.startswith(prefix + "/"))


# --------------------------------------------------------------------------- #
# Flat .npz of the Haiku trees
# --------------------------------------------------------------------------- #


def _export_prefixes(include_projector: bool) -> Tuple[str, ...]:
  return (ENCODER, PROJECTOR) if include_projector else (ENCODER,)


def _check_has_modules(params, prefixes) -> None:
  for prefix in prefixes:
    if not _modules_under(params, prefix):
      hint = (" or export with include_projector=False (config.export.include_projector)"
              if prefix == PROJECTOR else "")
      raise ValueError(f"params have no '{prefix}' modules: pass the online network's "
                       f"params (TrainState.online_params){hint}.")


def flatten_for_npz(params, state, *, include_projector: bool = False) -> Dict[str, np.ndarray]:
  """The flat `{"module/name": float32 array}` mapping that `export_npz` writes.

  BatchNorm moving statistics, which Haiku keeps as `<bn>/~/mean_ema` and
  `<bn>/~/var_ema` states, become `<bn>/mean` and `<bn>/var`; we take the EMA's
  `average`, which Haiku has already zero-debiased (it is what `is_training=False`
  uses). Integer counters are not exported.
  """
  prefixes = _export_prefixes(include_projector)
  _check_has_modules(params, prefixes)
  state = state or {}
  flat = {}
  for prefix in prefixes:
    for module in _modules_under(params, prefix):
      for name in params[module]:
        flat[f"{module}/{name}"] = _leaf(params, module, name, "params").astype(np.float32)
    for module in _modules_under(state, prefix):
      for ema, short in (("/~/mean_ema", "mean"), ("/~/var_ema", "var")):
        if module.endswith(ema):
          flat[f"{module[:-len(ema)]}/{short}"] = _leaf(
              state, module, "average", "state").astype(np.float32)
          break
      else:  # a state this module does not know: keep it, under its own name
        for name, value in state[module].items():
          array = _to_numpy(value, f"{module}/{name}")
          if np.issubdtype(array.dtype, np.floating):
            flat[f"{module}/{name}"] = array.astype(np.float32)
  return flat


def export_npz(params, state, path: str, *, include_projector: bool = False) -> str:
  """Writes the encoder (and optionally projector) as a flat float32 .npz, atomically.

  See `flatten_for_npz` for the key names. Returns `path`.
  """
  return _write_npz(flatten_for_npz(params, state, include_projector=include_projector), path)


def _write_npz(flat: Mapping[str, np.ndarray], path: str) -> str:
  with fileio.atomic_local_path(path) as tmp:
    # A file object, not a name: np.savez would append ".npz" to the temp name.
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
  return path


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads an `export_npz` file back as a flat dict (no pickle)."""
  with np.load(path, allow_pickle=False) as archive:
    return {key: archive[key] for key in archive.files}


# --------------------------------------------------------------------------- #
# torchvision state dict
# --------------------------------------------------------------------------- #


class _ConvNorm(NamedTuple):
  """One conv + norm pair: Haiku module paths, torchvision key prefixes, expected shape."""
  hk_conv: str
  hk_norm: str
  tv_conv: str
  tv_norm: str
  kernel: int
  in_channels: int
  out_channels: int


def check_model_config(model_config) -> None:
  """Raises a ValueError saying what to change if the encoder cannot be exported."""
  depth, width = model_config.depth, model_config.width
  if depth not in resnet.ARCHITECTURES:
    raise ValueError(f"Cannot export a ResNet of depth {depth!r}: model.depth must be one of "
                     f"{sorted(resnet.ARCHITECTURES)} (the depths byol_jax.resnet builds).")
  if not isinstance(width, int) or isinstance(width, bool) or width < 1:
    raise ValueError(f"Cannot export width {width!r}: model.width must be a positive "
                     "integer channel multiplier.")
  if model_config.stem not in resnet.STEMS:
    raise ValueError(f"Cannot export stem {model_config.stem!r}: model.stem must be one of "
                     f"{resnet.STEMS}.")
  if model_config.norm not in resnet.NORMS:
    raise ValueError(f"Cannot export norm {model_config.norm!r}: model.norm must be one of "
                     f"{resnet.NORMS}.")


def _encoder_layout(model_config) -> List[_ConvNorm]:
  """Every conv/norm pair of the encoder, in the order `resnet.ResNet` builds them."""
  check_model_config(model_config)
  kind, stage_sizes = resnet.ARCHITECTURES[model_config.depth]
  c0 = base_channels(model_config) * model_config.width  # stem width
  norm = "bn" if model_config.norm == "batch" else "gn"
  stem_kernel = 7 if model_config.stem == "imagenet" else 3
  pairs = [_ConvNorm("encoder/conv1", f"encoder/bn1/{norm}", "conv1", "bn1",
                     stem_kernel, 3, c0)]
  expansion = 4 if kind == "bottleneck" else 1
  in_channels = c0
  for stage, num_blocks in enumerate(stage_sizes):
    channels = c0 * 2**stage
    for b in range(num_blocks):
      hk_block, tv_block = f"encoder/layer{stage + 1}_{b}", f"layer{stage + 1}.{b}"
      if kind == "basic":
        convs = [(3, in_channels, channels), (3, channels, channels)]
      else:
        convs = [(1, in_channels, channels), (3, channels, channels),
                 (1, channels, channels * expansion)]
      for i, (kernel, cin, cout) in enumerate(convs, start=1):
        pairs.append(_ConvNorm(f"{hk_block}/conv{i}", f"{hk_block}/bn{i}/{norm}",
                               f"{tv_block}.conv{i}", f"{tv_block}.bn{i}", kernel, cin, cout))
      # Same rule as resnet.Block: a projection shortcut iff the shape changes.
      stride = 2 if (stage > 0 and b == 0) else 1
      if b == 0 and (stride != 1 or in_channels != channels * expansion):
        pairs.append(_ConvNorm(f"{hk_block}/downsample_conv",
                               f"{hk_block}/downsample_norm/{norm}",
                               f"{tv_block}.downsample.0", f"{tv_block}.downsample.1",
                               1, in_channels, channels * expansion))
      in_channels = channels * expansion
  return pairs


def _describe(model_config) -> str:
  m = model_config
  return f"depth={m.depth}, width={m.width}, stem={m.stem!r}, norm={m.norm!r}"


def _check_encoder_modules(params, state, layout, model_config) -> None:
  """The checkpoint must hold exactly the modules the config implies (no silent partial export)."""
  expected = {p.hk_conv for p in layout} | {p.hk_norm for p in layout}
  found = set(_modules_under(params, ENCODER))
  if expected != found:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    raise ValueError(
        f"The encoder params do not match model config ({_describe(model_config)}): "
        f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
        f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}. Export with the `model` "
        "config the checkpoint was trained with.")
  if model_config.norm == "batch" and not _modules_under(state or {}, ENCODER):
    raise ValueError("The state has no encoder BatchNorm statistics: pass the network state "
                     "(TrainState.online_state) along with the params.")


def _conv_weight(params, pair: _ConvNorm, weight_standardised: bool) -> np.ndarray:
  """HWIO kernel -> torch OIHW, with weight standardisation folded in if the model used it."""
  w = _leaf(params, pair.hk_conv, "w", "params").astype(np.float64)
  expected = (pair.kernel, pair.kernel, pair.in_channels, pair.out_channels)
  if w.shape != expected:
    raise ValueError(f"{pair.hk_conv}/w has shape {w.shape}, but the model config implies "
                     f"{expected}. Export with the `model` config the checkpoint was trained with.")
  if weight_standardised:
    # Exactly what resnet.WSConv2D computes at every forward: per output channel,
    # over (H, W, I), population variance. In float64 so folding adds no error.
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    w = (w - mean) / np.sqrt(var + WS_EPS)
  return np.ascontiguousarray(w.transpose(3, 2, 0, 1), dtype=np.float32)


def _batch_norm(params, state, hk_module: str, tv_prefix: str) -> Dict[str, np.ndarray]:
  """Haiku BatchNorm (params + EMA states) -> torch BatchNorm{1,2}d entries.

  Haiku's moving variance is the EMA of the biased batch variance while torch
  would have tracked the unbiased one; in eval mode both layers compute
  (x - mean) / sqrt(var + eps) * weight + bias, so exporting Haiku's value as
  `running_var` reproduces Haiku's eval outputs exactly.
  """
  flat = lambda a: np.ascontiguousarray(a.reshape(-1), dtype=np.float32)
  stats = {}
  for ema, key in (("mean_ema", "running_mean"), ("var_ema", "running_var")):
    stats[key] = flat(_leaf(state, f"{hk_module}/~/{ema}", "average", "state"))
  # The EMA's update counter is the number of training-mode batches seen.
  counter = _leaf(state, f"{hk_module}/~/mean_ema", "counter", "state")
  return {
      f"{tv_prefix}.weight": flat(_leaf(params, hk_module, "scale", "params")),
      f"{tv_prefix}.bias": flat(_leaf(params, hk_module, "offset", "params")),
      f"{tv_prefix}.running_mean": stats["running_mean"],
      f"{tv_prefix}.running_var": stats["running_var"],
      f"{tv_prefix}.num_batches_tracked": np.asarray(counter, dtype=np.int64).reshape(()),
  }


def _group_norm(params, hk_module: str, tv_prefix: str) -> Dict[str, np.ndarray]:
  flat = lambda a: np.ascontiguousarray(a.reshape(-1), dtype=np.float32)
  return {f"{tv_prefix}.weight": flat(_leaf(params, hk_module, "scale", "params")),
          f"{tv_prefix}.bias": flat(_leaf(params, hk_module, "offset", "params"))}


def _linear(params, hk_module: str, tv_prefix: str) -> Dict[str, np.ndarray]:
  w = _leaf(params, hk_module, "w", "params")  # Haiku: [in, out]; torch: [out, in]
  return {f"{tv_prefix}.weight": np.ascontiguousarray(w.T, dtype=np.float32),
          f"{tv_prefix}.bias": np.ascontiguousarray(_leaf(params, hk_module, "b", "params"),
                                                    dtype=np.float32)}


def _projector_state_dict(params, state) -> Dict[str, np.ndarray]:
  """The projector MLP as `nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)` under `projector.`."""
  _check_has_modules(params, (PROJECTOR,))
  return {**_linear(params, "projector/linear1", "projector.0"),
          **_batch_norm(params, state or {}, "projector/bn", "projector.1"),
          **_linear(params, "projector/linear2", "projector.3")}


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
  * Width 1, ImageNet stem, BatchNorm: `torchvision.models.resnet{18,34,50,101,152}()`
    (weights=None) as is. Depth 200 has no torchvision constructor; build
    `torchvision.models.resnet.ResNet(Bottleneck, [3, 24, 36, 3])`.
  * CIFAR stem (`model.stem="cifar"`): conv1 is 3x3 stride 1 and there is no
    max-pool. Before loading, set
    `model.conv1 = nn.Conv2d(3, 64 * w, 3, 1, 1, bias=False)` and
    `model.maxpool = nn.Identity()`.
  * Width w > 1: our w multiplies *every* channel count, the 64-channel stem and
    the block outputs included (conv1 has 64w channels, stage i has inner width
    64w*2^i and output 64w*2^i*expansion, the embedding is 512w*expansion), as in
    the BYOL/SimCLR "ResNet-50 (2x)". That is NOT torchvision's
    `wide_resnet50_2`, which widens only the bottleneck's inner 3x3
    (`width_per_group=128`) and keeps a 64-channel stem and 256..2048-channel
    block outputs; its shapes do not match. torchvision has no constructor for
    our w > 1 (its stem width is hard-coded); use
    `byol_jax.torch_resnet.resnet(depth, width=w, stem=..., norm=...)`, which has
    torchvision's module names.
  * GroupNorm + weight standardisation (`model.norm="group_ws"`): the
    standardisation is folded into the exported conv weights (exact for
    inference), so the torch convolutions are plain `nn.Conv2d`. The GroupNorm
    affine parameters are exported under the same `bn*` / `downsample.1` keys,
    as `.weight` / `.bias` only (GroupNorm has no running statistics). Build the
    model with `norm_layer=lambda c: nn.GroupNorm(32, c, eps=1e-5)`. Fine-tuning
    it in torch trains it without weight standardisation.

  Inputs are NCHW RGB in [0, 1], normalised with torchvision's ImageNet mean/std
  (`train_step.IMAGE_MEAN` / `IMAGE_STD`), exactly as in training.

  With `include_projector=True`, the projector is added as `projector.0.weight`,
  `projector.0.bias` (Linear), `projector.1.*` (BatchNorm1d), `projector.3.*`
  (Linear), matching `model.projector = nn.Sequential(Linear, BatchNorm1d, ReLU,
  Linear)` (`torch_resnet.projector`).
  """
  layout = _encoder_layout(model_config)
  _check_encoder_modules(params, state, layout, model_config)
  weight_standardised = model_config.norm == "group_ws"
  out = {}
  for pair in layout:
    out[f"{pair.tv_conv}.weight"] = _conv_weight(params, pair, weight_standardised)
    if weight_standardised:
      out.update(_group_norm(params, pair.hk_norm, pair.tv_norm))
    else:
      out.update(_batch_norm(params, state, pair.hk_norm, pair.tv_norm))
  if include_projector:
    out.update(_projector_state_dict(params, state))
  return out


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def base_channels(model_config) -> int:
  """Stem channels at width 1: 64 for every standard ResNet, less for CPU demo nets."""
  return int(_get(model_config, "base_channels", 64))


def _embedding_dim(model_config) -> int:
  return resnet.embedding_dim(model_config.depth, model_config.width, base_channels(model_config))


def architecture_name(model_config) -> str:
  """"resnet50", "resnet50_2x" for width 2 (our all-channel multiplier, not wide_resnet),
  "resnet18_base32" for a narrow demo net."""
  name = f"resnet{model_config.depth}"
  if model_config.width != 1:
    name += f"_{model_config.width}x"
  if base_channels(model_config) != 64:
    name += f"_base{base_channels(model_config)}"
  return name


def torchvision_metadata(model_config, *, include_projector: bool = False) -> Dict[str, str]:
  """safetensors metadata (a str -> str mapping) describing the exported model."""
  check_model_config(model_config)
  return {
      "format": "byol_jax.torchvision_resnet",
      "format_version": FORMAT_VERSION,
      "architecture": architecture_name(model_config),
      "depth": str(model_config.depth),
      "width": str(model_config.width),
      "base_channels": str(base_channels(model_config)),
      "stem": model_config.stem,
      "norm": model_config.norm,
      "torch_norm_layer": ("BatchNorm2d(eps=1e-5)" if model_config.norm == "batch"
                           else "GroupNorm(32, C, eps=1e-5); conv weights are pre-standardised"),
      "embedding_dim": str(_embedding_dim(model_config)),
      "includes_projector": str(bool(include_projector)).lower(),
      "input_layout": "NCHW RGB, scaled to [0, 1], then (x - input_mean) / input_std",
      "input_mean": json.dumps(list(IMAGE_MEAN)),
      "input_std": json.dumps(list(IMAGE_STD)),
  }


def save_torchvision_safetensors(params, state, model_config, path: str, *,
                                 include_projector: bool = False) -> str:
  """Writes `to_torchvision(...)` as a .safetensors file (atomically); returns `path`.

  Load with `safetensors.torch.load_file(path)` and `model.load_state_dict(...)`
  (see `to_torchvision` for building the model), or
  `byol_jax.torch_resnet.load_safetensors(path)`, which reads the metadata.
  """
  tensors = to_torchvision(params, state, model_config, include_projector=include_projector)
  metadata = torchvision_metadata(model_config, include_projector=include_projector)
  with fileio.atomic_local_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
  return path


def _get(config, name: str, default=None):
  """config.name for ConfigDicts, dicts and plain objects alike, with a default."""
  if config is None:
    return default
  if isinstance(config, Mapping) or hasattr(config, "get"):
    return config.get(name, default)
  return getattr(config, name, default)


def _write_json(obj, path: str) -> str:
  with fileio.atomic_local_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
  return path


def run_export(params, state, config, out_dir: str) -> Dict[str, str]:
  """Writes `encoder.npz`, `encoder_torchvision.safetensors` and `export.json` to `out_dir`.

  `params` / `state` are the online network's (`TrainState.online_params` /
  `online_state`) of the final checkpoint; `config` is the full experiment
  config (`config.model`, `config.export.include_projector`,
  `config.data.image_size`). Call it from one process only. Returns
  `{"npz": path, "safetensors": path, "json": path}`.
  """
  model_config = config.model
  include_projector = bool(_get(_get(config, "export"), "include_projector", False))
  check_model_config(model_config)
  paths = {"npz": os.path.join(out_dir, NPZ_NAME),
           "safetensors": os.path.join(out_dir, SAFETENSORS_NAME),
           "json": os.path.join(out_dir, JSON_NAME)}
  flat = flatten_for_npz(params, state, include_projector=include_projector)
  _write_npz(flat, paths["npz"])
  save_torchvision_safetensors(params, state, model_config, paths["safetensors"],
                               include_projector=include_projector)
  image_size = _get(_get(config, "data"), "image_size")
  description = {
      "format_version": FORMAT_VERSION,
      "architecture": architecture_name(model_config),
      "depth": model_config.depth,
      "width": model_config.width,
      "width_semantics": "multiplies every channel count incl. the stem (BYOL/SimCLR 'Nx'); "
                         "not torchvision's wide_resnet",
      "stem": model_config.stem,
      "norm": model_config.norm,
      "base_channels": base_channels(model_config),
      "embedding_dim": _embedding_dim(model_config),
      "input_size": image_size,
      "input_normalization": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                              "applied_to": "RGB images scaled to [0, 1]"},
      "includes_projector": include_projector,
      "projection_dim": (int(flat["projector/linear2/w"].shape[1]) if include_projector
                         else None),
      "files": {
          "npz": {"path": NPZ_NAME, "layout": "Haiku: '<module>/<name>' float32, conv HWIO, "
                  "NHWC inputs; BatchNorm statistics as '<bn>/mean', '<bn>/var'",
                  "num_arrays": len(flat)},
          "safetensors": {"path": SAFETENSORS_NAME,
                          "layout": "torchvision ResNet state dict (no fc.*), conv OIHW, "
                                    "NCHW inputs",
                          "load": "byol_jax.torch_resnet.load_safetensors(path), or see "
                                  "byol_jax.export.to_torchvision"},
      },
  }
  _write_json(description, paths["json"])
  return paths
