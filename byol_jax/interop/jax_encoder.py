"""`load_encoder(path)`: a trained encoder as one jitted JAX function, for downstream code.

    encoder = byol_jax.load_encoder("runs/demo")          # a workdir: its newest checkpoint
    encoder = byol_jax.load_encoder("runs/demo/export")   # or what --job=export wrote
    embeddings = encoder(images)  # uint8 [N, H, W, 3] in 0..255, or float in [0, 1] -> [N, D]

An export folder is rebuilt from what `export.json` records (the encoder fields
`depth`, `width`, `base_channels`, `stem`, `norm`, `padding`) with the arrays of
`encoder.npz`; a workdir from its newest readable checkpoint (the model config
saved with it). Either way the network is byol_jax's own ResNet, so the
embeddings are those `--job=knn`, `--job=compare` and `--job=embed` read: BN in
inference mode, each image independent of the rest of its batch, any batch
size. Images should be the pretraining size (`encoder.input_size`) and
preprocessed as at evaluation (centre crop, resize); the network is
convolutional, so other sizes run, but they are not what it learned on.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.errors import ConfigError
from byol_jax import fileio
from byol_jax.configs import base
from byol_jax.interop import export
from byol_jax.interop.torchvision_export import ENCODER_FIELDS
from byol_jax.model import networks
from byol_jax.train import checkpoint, parallel


class Encoder:
  """`encoder(images) -> embeddings`: the jitted forward of one trained encoder."""

  def __init__(self, model_config, params, state, input_size: int, source: str):
    self.model, self.params, self.state = model_config, params, state
    self.input_size, self.source = int(input_size), source
    transform = networks.make_networks(model_config, num_classes=1).encoder
    self._apply = jax.jit(lambda p, s, x: transform.apply(p, s, x, False)[0])
    one = jax.ShapeDtypeStruct((1, self.input_size, self.input_size, 3), jnp.float32)
    self.embedding_dim = int(jax.eval_shape(self._apply, params, state, one).shape[-1])

  def __call__(self, images) -> jax.Array:
    """uint8 (0..255) or float ([0, 1]) images, [N, H, W, 3] or one [H, W, 3] -> [N, D]."""
    images = jnp.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Expected RGB images [N, H, W, 3] (or one [H, W, 3]), got shape "
                       f"{list(images.shape)}.")
    if images.dtype != jnp.uint8:
      images = images.astype(jnp.float32)
    return self._apply(self.params, self.state, images)

  def __repr__(self) -> str:
    fields = ", ".join(f"{f}={self.model[f]!r}" for f in ENCODER_FIELDS)
    return (f"Encoder({fields}, embedding_dim={self.embedding_dim}, "
            f"input_size={self.input_size}, from {self.source!r})")


def load_encoder(path: str) -> Encoder:
  """The encoder of a workdir (its newest checkpoint) or of an export folder."""
  export_dir = path if fileio.exists(os.path.join(path, export.JSON_NAME)) else None
  if export_dir is None and not fileio.exists(checkpoint.checkpoint_dir(path)):
    nested = os.path.join(path, "export")
    if fileio.exists(os.path.join(nested, export.JSON_NAME)):
      export_dir = nested
    else:
      raise FileNotFoundError(
          f"{path} holds neither an export ({export.JSON_NAME}, written by --job=export) nor "
          "checkpoints/ (written by --job=pretrain); pass a workdir or its export/ folder.")
  if export_dir is not None:
    return _from_export(export_dir)
  return _from_checkpoint(path)


def _from_checkpoint(workdir: str) -> Encoder:
  config, _, params, state = checkpoint.load_pretrained(base.get_base_config(), workdir,
                                                        parallel.make_mesh())
  params, state = jax.device_get((networks.encoder_subset(params),
                                  networks.encoder_subset(state)))
  return Encoder(config.model, params, state, config.data.image_size, workdir)


def _from_export(folder: str) -> Encoder:
  description = json.loads(fileio.read_text(os.path.join(folder, export.JSON_NAME)))
  model = base.get_base_config().model
  model.update({f: description[f] for f in ENCODER_FIELDS})
  flat = export.load_npz(os.path.join(folder, export.NPZ_NAME))
  size = int(description["input_size"])
  transform = networks.make_networks(model, num_classes=1).encoder
  shapes = jax.eval_shape(lambda rng, x: transform.init(rng, x, True), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  params = {m: {n: _array(flat, f"{m}/{n}", s, folder) for n, s in leaves.items()}
            for m, leaves in shapes[0].items()}
  return Encoder(model, params, _state(flat, shapes[1], folder), size, folder)


def _state(flat: dict, shapes: dict, folder: str) -> dict:
  """Haiku's BN state from the export's `<bn>/mean` and `<bn>/var` (its zero-debiased
  averages, all that inference reads; the EMA's counter and hidden value follow them)."""
  state = {}
  for module, leaves in shapes.items():
    for suffix, short in (("/~/mean_ema", "mean"), ("/~/var_ema", "var")):
      if module.endswith(suffix):
        average = _array(flat, f"{module[:-len(suffix)]}/{short}", leaves["average"], folder)
        state[module] = {"average": average, "hidden": average,
                         "counter": np.ones(leaves["counter"].shape, leaves["counter"].dtype)}
        break
    else:
      state[module] = {n: _array(flat, f"{module}/{n}", s, folder) for n, s in leaves.items()}
  return state


def _array(flat: dict, key: str, shape, folder: str) -> np.ndarray:
  if key not in flat:
    raise ConfigError(f"{folder}/{export.NPZ_NAME} has no array {key!r}, which the network its "
                      f"{export.JSON_NAME} describes needs; re-run --job=export.")
  value = flat[key]
  if value.shape != shape.shape:
    raise ConfigError(f"{folder}/{export.NPZ_NAME}: {key!r} is {list(value.shape)}, the network "
                      f"its {export.JSON_NAME} describes needs {list(shape.shape)}; re-run "
                      "--job=export.")
  return value.astype(shape.dtype)
