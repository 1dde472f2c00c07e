"""Export of a trained BYOL encoder (and optionally its projector).

Two formats, both pickle-free:

* `encoder.npz` (`export_npz`): the Haiku parameters and BatchNorm moving
  statistics as a flat mapping `"<haiku module path>/<name>" -> float32 array`,
  e.g. `encoder/conv1/w` (HWIO), `encoder/bn1/bn/scale`, `encoder/bn1/bn/offset`,
  `encoder/bn1/bn/mean`, `encoder/bn1/bn/var`. Arrays keep their Haiku shapes
  (BatchNorm parameters and statistics are `[1, 1, 1, C]` in the encoder and
  `[1, C]` in the projector), so splitting a key at its last "/" rebuilds the
  Haiku params tree.
* `encoder_torchvision.safetensors`: the encoder as a `torchvision.models.resnet*`
  state dict, with the architecture and the input normalisation in the file's
  metadata (`torchvision_export.py`).

`run_export` writes both plus an `export.json` that describes them.
"""

import json
import os
import shutil
import tempfile
import zipfile
from typing import Dict, Mapping, Tuple

import numpy as np

from byol_jax.errors import ConfigError
from byol_jax import fileio
from byol_jax.interop import torchvision_export as tv
from byol_jax.model.networks import IMAGE_MEAN, IMAGE_STD

NPZ_NAME = "encoder.npz"
SAFETENSORS_NAME = "encoder_torchvision.safetensors"
JSON_NAME = "export.json"


def _export_prefixes(include_projector: bool) -> Tuple[str, ...]:
  return (tv.ENCODER, tv.PROJECTOR) if include_projector else (tv.ENCODER,)


def flatten_for_npz(params, state, *, include_projector: bool = False) -> Dict[str, np.ndarray]:
  """The flat `{"module/name": float32 array}` mapping that `export_npz` writes.

  BatchNorm moving statistics, which Haiku keeps as `<bn>/~/mean_ema` and
  `<bn>/~/var_ema` states, become `<bn>/mean` and `<bn>/var`; we take the EMA's
  `average`, which Haiku has already zero-debiased (it is what `is_training=False`
  uses). Integer counters are not exported.
  """
  prefixes = _export_prefixes(include_projector)
  tv.check_has_modules(params, prefixes)
  state = state or {}
  flat = {}
  for prefix in prefixes:
    for module in tv.modules_under(params, prefix):
      for name in params[module]:
        flat[f"{module}/{name}"] = tv.leaf(params, module, name, "params").astype(np.float32)
    for module in tv.modules_under(state, prefix):
      for ema, short in (("/~/mean_ema", "mean"), ("/~/var_ema", "var")):
        if module.endswith(ema):
          flat[f"{module[:-len(ema)]}/{short}"] = tv.leaf(
              state, module, "average", "state").astype(np.float32)
          break
      else:  # a state this module does not know: keep it, under its own name
        for name, value in state[module].items():
          array = tv.host_array(value, f"{module}/{name}")
          if np.issubdtype(array.dtype, np.floating):
            flat[f"{module}/{name}"] = array.astype(np.float32)
  return flat


def export_npz(params, state, path: str, *, include_projector: bool = False) -> str:
  """Writes the encoder (and optionally projector) as a flat float32 .npz, atomically.

  See `flatten_for_npz` for the key names. Returns `path`.
  """
  return write_npz(flatten_for_npz(params, state, include_projector=include_projector), path)


def write_npz(flat: Mapping[str, np.ndarray], path: str) -> str:
  """Writes named arrays as an .npz at `path` (local or gs://), atomically; returns `path`."""
  with fileio.atomic_local_path(path) as tmp:
    # A file object, not a name: np.savez would append ".npz" to the temp name.
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
  return path


class NpzRows:
  """An .npz written row by row: `append` chunks of named arrays (each chunk's rows go to
  a local temporary file), `write` then puts them, with whole arrays, into one .npz at
  `path` (local or gs://), atomically. Host memory: one chunk, whatever the row count."""

  def __init__(self):
    self._dir = tempfile.mkdtemp(prefix="byol_jax_rows_")
    self._files, self._layout, self.rows = {}, {}, 0

  def append(self, chunk: Mapping[str, np.ndarray]) -> None:
    for name, rows in chunk.items():
      rows = np.ascontiguousarray(rows)
      self._layout.setdefault(name, (rows.dtype, rows.shape[1:]))
      if name not in self._files:
        self._files[name] = open(os.path.join(self._dir, f"{name}.raw"), "wb")
      self._files[name].write(rows.tobytes())
    self.rows += len(next(iter(chunk.values()))) if chunk else 0

  def dims(self) -> dict:
    """{name: size of a row} of the appended arrays of one dimension per row."""
    return {name: tail[0] for name, (_, tail) in self._layout.items() if len(tail) == 1}

  def write(self, path: str, whole: Mapping[str, np.ndarray]) -> str:
    """The appended rows and the `whole` arrays as one .npz at `path`; returns `path`."""
    for f in self._files.values():
      f.close()
    try:
      with fileio.atomic_local_path(path) as tmp, zipfile.ZipFile(tmp, "w",
                                                                    allowZip64=True) as zf:
        for name, (dtype, tail) in self._layout.items():
          header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": (self.rows, *tail)}
          with zf.open(f"{name}.npy", "w", force_zip64=True) as out, \
              open(os.path.join(self._dir, f"{name}.raw"), "rb") as raw:
            np.lib.format.write_array_header_2_0(out, header)
            shutil.copyfileobj(raw, out, 2**24)
        for name, array in whole.items():
          with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
    finally:
      shutil.rmtree(self._dir, ignore_errors=True)
    return path


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads an `export_npz` file back as a flat dict (no pickle)."""
  with np.load(path, allow_pickle=False) as archive:
    return {key: archive[key] for key in archive.files}


def _write_json(obj, path: str) -> str:
  with fileio.atomic_local_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
  return path


def run_export(params, state, config, out_dir: str) -> Dict[str, str]:
  """Writes `encoder.npz`, `encoder_torchvision.safetensors` and `export.json` to `out_dir`.

  `params` / `state` are the online network's of the final checkpoint; `config`
  is the full experiment config (`config.model`, `config.export.include_projector`,
  `config.data.image_size`). Call it from one process only. Returns
  `{"npz": path, "safetensors": path, "json": path}`.
  """
  model_config = config.model
  include_projector = bool(config.export.include_projector)
  if include_projector and not model_config.head_norm:
    raise ConfigError("The torchvision projector has a BatchNorm layer, which this model's heads "
                      "lack (model.head_norm=False); export with "
                      "--config.export.include_projector=False.")
  # First, as it checks the model config: nothing is written for a config that cannot export.
  metadata = tv.torchvision_metadata(model_config, include_projector=include_projector)
  paths = {"npz": os.path.join(out_dir, NPZ_NAME),
           "safetensors": os.path.join(out_dir, SAFETENSORS_NAME),
           "json": os.path.join(out_dir, JSON_NAME)}
  tv.save_torchvision_safetensors(params, state, model_config, paths["safetensors"],
                                  include_projector=include_projector)
  flat = flatten_for_npz(params, state, include_projector=include_projector)
  write_npz(flat, paths["npz"])
  description = {
      "format_version": metadata["format_version"],
      "architecture": metadata["architecture"],
      **{f: model_config[f] for f in tv.ENCODER_FIELDS},
      "width_semantics": "multiplies every channel count incl. the stem (BYOL/SimCLR 'Nx'); "
                         "not torchvision's wide_resnet",
      "embedding_dim": tv.embedding_dim(model_config),
      "input_size": config.data.image_size,
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
                                  "byol_jax.interop.torchvision_export.to_torchvision"},
      },
  }
  _write_json(description, paths["json"])
  return paths
