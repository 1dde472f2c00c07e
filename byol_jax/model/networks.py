"""BYOL's online and target networks as Haiku transforms.

The online network is encoder -> projector -> predictor, plus a linear probe on
the stop-gradient embedding. The target network is encoder -> projector only:
it never needs a predictor or a probe, so we do not compute them. Both use the
same module names, so the target's parameters are exactly the online subset
`target_subset(online_params)` and the EMA is a plain tree map.
"""

from typing import Any, Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from byol_jax.model import resnet

TARGET_MODULES = ("encoder", "projector")
# torchvision's input normalisation, so exported encoders drop into PyTorch code.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def preprocess(images):
  """uint8 [0, 255] or float [0, 1] images -> normalised as torchvision does.

  Every network below starts with it, so callers pass images as the pipeline
  made them and the export's metadata names the same constants.
  """
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  elif images.dtype == jnp.float16:  # host views travel as float16; compute is f32 or bf16
    images = images.astype(jnp.float32)
  return (images - jnp.asarray(IMAGE_MEAN, images.dtype)) / jnp.asarray(IMAGE_STD, images.dtype)


class MLP(hk.Module):
  """Linear -> BatchNorm -> ReLU -> Linear (the BYOL projector / predictor).

  The released code's output layer has no bias (`output_bias` is for older
  checkpoints); `batch_norm=False` is the ablation without batch statistics.
  """

  def __init__(self, hidden: int, output: int, output_bias: bool, batch_norm: bool, name: str):
    super().__init__(name=name)
    self.hidden, self.output = hidden, output
    self.output_bias, self.batch_norm = output_bias, batch_norm

  def __call__(self, x, is_training: bool, views: int = 1):
    x = hk.Linear(self.hidden, name="linear1")(x)
    if self.batch_norm:
      x = resnet.batch_norm(x, is_training, views=views)
    return hk.Linear(self.output, with_bias=self.output_bias, name="linear2")(jax.nn.relu(x))


def _encoder(model_config) -> resnet.ResNet:
  return resnet.ResNet(depth=model_config.depth, width=model_config.width,
                       stem=model_config.stem, norm=model_config.norm,
                       zero_init_residual=model_config.zero_init_residual,
                       base_channels=model_config.base_channels,
                       padding=model_config.padding, remat=model_config.remat,
                       max_pool=model_config.max_pool, name="encoder")


def _projector(model_config) -> MLP:
  return MLP(model_config.projector_hidden, model_config.projection_dim,
             model_config.head_bias, model_config.head_norm, "projector")


class Networks(NamedTuple):
  """`online` and `target` take (images, is_training, views=1); with views > 1 the rows of
  `images` interleave that many views of each example, and BatchNorm is per view."""
  online: hk.TransformedWithState   # images -> {embedding, projection, prediction, logits}
  target: hk.TransformedWithState   # images -> {projection}
  encoder: hk.TransformedWithState  # images -> embedding (for evaluation and export)


def make_networks(model_config, num_classes: int) -> Networks:
  """Builds the transforms from the `model` block of a config."""

  def online(images, is_training: bool, views: int = 1):
    embedding = _encoder(model_config)(preprocess(images), is_training, views)
    projection = _projector(model_config)(embedding, is_training, views)
    if model_config.use_predictor:
      prediction = MLP(model_config.predictor_hidden, model_config.projection_dim,
                       model_config.head_bias, model_config.head_norm,
                       "predictor")(projection, is_training, views)
    else:  # the paper's ablation: without a predictor BYOL collapses
      prediction = projection
    # The probe sees a stop-gradient copy: its loss can never shape the encoder.
    logits = hk.Linear(max(num_classes, 1), name="probe")(jax.lax.stop_gradient(embedding))
    return dict(embedding=embedding, projection=projection, prediction=prediction,
                logits=logits)

  def target(images, is_training: bool, views: int = 1):
    embedding = _encoder(model_config)(preprocess(images), is_training, views)
    return dict(projection=_projector(model_config)(embedding, is_training, views))

  def encoder(images, is_training: bool):
    return _encoder(model_config)(preprocess(images), is_training)

  return Networks(*(hk.without_apply_rng(hk.transform_with_state(f))
                    for f in (online, target, encoder)))


def size(nets: Networks, params, state, image_size: int) -> dict:
  """Parameter counts and the encoder's inference FLOPs per image.

  FLOPs are XLA's cost analysis of the lowered (unoptimised) forward of one
  image: a multiply-add counts 2, and kernel taps that fall in the zero padding
  are not counted (ResNet-50 at 224 px: 7.9 G, where papers quote ~4.1 G
  multiply-adds with the padding's taps).
  """
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  lowered = jax.jit(lambda p, s, x: nets.encoder.apply(p, s, x, False)).lower(
      shapes(encoder_subset(params)), shapes(encoder_subset(state)), image)
  return {"encoder_params": count(encoder_subset(params)), "online_params": count(params),
          "encoder_flops_per_image": float(lowered.cost_analysis()["flops"])}


def size_line(sizes: dict, image_size: int) -> str:
  return (f"encoder {sizes['encoder_params']:,} parameters (online network "
          f"{sizes['online_params']:,}), {sizes['encoder_flops_per_image'] / 1e6:,.1f} MFLOPs "
          f"per {image_size}x{image_size} image (forward; multiply-add = 2)")


def _is_target_module(module_name: str) -> bool:
  return module_name.split("/")[0] in TARGET_MODULES


def target_subset(tree: Mapping[str, Any]) -> hk.Params:
  """The encoder and projector part of an online params (or state) tree."""
  return hk.data_structures.filter(lambda m, n, v: _is_target_module(m), tree)


def encoder_subset(tree: Mapping[str, Any]) -> hk.Params:
  return hk.data_structures.filter(lambda m, n, v: m.split("/")[0] == "encoder", tree)


def param_dtype(compute_dtype) -> jnp.dtype:
  """Parameters, BN statistics, losses and optimizer state for a compute dtype: float32
  under bfloat16 or float32, float64 under float64 (parity runs, with jax_enable_x64)."""
  return jnp.promote_types(compute_dtype, jnp.float32)


def cast_floating(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)
