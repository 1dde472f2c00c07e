"""DeepMind's BYOL state (deepmind-research/byol) <-> byol_jax's, and its released files.

`to_byol_jax` renames the reference's modules (hk.nets.ResNet's names under
`res_net50`, `res_net200`, ...; its MLPs `projector` and `predictor`; the online
`classifier`, which becomes byol_jax's `probe`) and checks every shape against
byol_jax's network. hk.nets.ResNet's bottleneck blocks (v1, stride on the 3x3,
a projection shortcut in every stage's first block) are byol_jax's; its "SAME"
padding needs `model.padding="haiku_same"`. `to_train_state` maps the whole
experiment state (both networks, BatchNorm statistics, LARS momentum, step)
with the same names, `from_train_state` back. `import_file` reads a released
file through `reference_pickle.load`, which runs no code from it.
"""

import re
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.errors import ConfigError
from byol_jax.interop import reference_pickle
from byol_jax.model import networks
from byol_jax.train import optim
from byol_jax.train.train_step import TrainState

ENCODER = "encoder"


# --------------------------------------------------------------------------- #
# Module names: hk.nets.ResNet and the reference's MLPs <-> byol_jax
# --------------------------------------------------------------------------- #

_ENC = "<encoder>/~/"  # the reference's encoder module: res_net50, res_net200, ...
_BLOCK = _ENC + "block_group_{g}/~/block_{b}/~/"
_LAYER = ENCODER + "/layer{g+1}_{b}/"
# (the reference's module, byol_jax's), read either way. {g}, {b}, {i} are the
# reference's 0-based block group, block and layer; byol_jax counts stages and
# layers from 1 ({g+1}, {i+1}).
_NAMES = (
    (_ENC + "initial_conv", ENCODER + "/conv1"),
    (_ENC + "initial_batchnorm", ENCODER + "/bn1/bn"),
    (_BLOCK + "conv_{i}", _LAYER + "conv{i+1}"),
    (_BLOCK + "batchnorm_{i}", _LAYER + "bn{i+1}/bn"),
    (_BLOCK + "shortcut_conv", _LAYER + "downsample_conv"),
    (_BLOCK + "shortcut_batchnorm", _LAYER + "downsample_norm/bn"),
    # The reference's MLP makes its layers inside __call__, hence Haiku's default names.
    *((f"{head}/{ref}", f"{head}/{ours}") for head in ("projector", "predictor")
      for ref, ours in (("linear", "linear1"), ("batch_norm", "bn"), ("linear_1", "linear2"))),
    ("classifier", "probe"),  # the online classifier on the stop-gradient embedding
)
_FIELD = re.compile(r"\{(\w)(\+1)?\}")


def _translate(name: str, source: str, target: str) -> Optional[str]:
  """`name` read with the template `source`, written with `target`; None if it does not fit."""
  pieces = _FIELD.split(source)  # text, field, "+1" or None, text, ...
  regex = "".join(re.escape(p) if i % 3 == 0 else f"(?P<{p}>\\d+)" if i % 3 == 1 else ""
                  for i, p in enumerate(pieces))
  m = re.fullmatch(regex, name)
  if m is None:
    return None
  zero_based = {k: int(v) - (f"{{{k}+1}}" in source) for k, v in m.groupdict().items()}
  return _FIELD.sub(lambda f: str(zero_based[f[1]] + bool(f[2])), target)


def _rename_module(module: str, encoder: str, to_byol_jax: bool) -> Optional[str]:
  base, ema = re.fullmatch(r"(.*?)((?:/~/(?:mean|var)_ema)?)", module).groups()
  for ref, ours in _NAMES:
    ref = ref.replace(_ENC, f"{encoder}/~/")
    new = _translate(base, ref, ours) if to_byol_jax else _translate(base, ours, ref)
    if new is not None:
      return new + ema
  return None


def byol_jax_module(module: str, encoder: str) -> Optional[str]:
  """e.g. "res_net50/~/block_group_1/~/block_0/~/batchnorm_2/~/mean_ema" ->
  "encoder/layer2_0/bn3/bn/~/mean_ema"; None for a module byol_jax has no place for."""
  return _rename_module(module, encoder, to_byol_jax=True)


def reference_module(module: str, encoder: str) -> Optional[str]:
  """The inverse of `byol_jax_module`; None for a module the reference has no place for."""
  return _rename_module(module, encoder, to_byol_jax=False)


def _encoder_name(params) -> str:
  names = sorted({m[:-len("/~/initial_conv")] for m in params if m.endswith("/~/initial_conv")})
  if len(names) != 1:
    raise ConfigError(f"Expected one ResNet encoder (a '<name>/~/initial_conv' module) in the "
                      f"online params, found {names}: this is not a BYOL ResNet checkpoint.")
  return names[0]


# --------------------------------------------------------------------------- #
# Import
# --------------------------------------------------------------------------- #


class Imported(NamedTuple):
  params: Dict[str, Dict[str, np.ndarray]]
  state: Dict[str, Dict[str, np.ndarray]]
  step: int
  num_classes: int   # of the online classifier (byol_jax's probe); 0 if the file has none


def _plain(tree, what: str) -> Dict[str, Dict[str, np.ndarray]]:
  try:
    return {str(m): {str(n): np.asarray(v) for n, v in leaves.items()}
            for m, leaves in tree.items()}
  except AttributeError:
    raise ConfigError(f"The checkpoint's {what} are not a Haiku tree of arrays.") from None


def _rename(tree: dict, encoder: str, what: str) -> Tuple[dict, Dict[str, str]]:
  """(tree under byol_jax's module names, {byol_jax module: the file's module})."""
  renamed, sources = {}, {}
  for module, leaves in tree.items():
    new = byol_jax_module(module, encoder)
    if new is None:
      raise ConfigError(f"The checkpoint's {what} hold {module}, which byol_jax's network has "
                        "no place for: it is not a ResNet-50/101/152/200 BYOL checkpoint.")
    renamed[new], sources[new] = leaves, module
  return renamed, sources


def _check_and_cast(tree: dict, sources: dict, expected: dict, what: str, describe: str) -> dict:
  """`tree` with exactly `expected`'s modules, leaves and shapes, in its dtypes."""
  hint = ("pass the model config the file was trained with (pretrain_res200x2.pkl: "
          "--config.model.depth=200 --config.model.width=2)")
  unexpected = sorted(set(tree) - set(expected))
  if unexpected:
    raise ConfigError(f"The checkpoint's {what} hold {sources[unexpected[0]]} (byol_jax's "
                      f"{unexpected[0]}), which byol_jax's network ({describe}) lacks: {hint}.")
  out = {}
  for module, leaves in expected.items():
    found = tree.get(module, {})
    for name, spec in leaves.items():
      if name not in found:
        raise ConfigError(f"The checkpoint's {what} have no tensor for byol_jax's "
                          f"{module}/{name} (shape {spec.shape}): the file is incomplete or "
                          "not a BYOL checkpoint.")
      if found[name].shape != spec.shape:
        raise ConfigError(f"{sources[module]}/{name} has shape {found[name].shape} but byol_jax's "
                          f"{module}/{name} ({describe}) has {spec.shape}: {hint}.")
    extra = sorted(set(found) - set(leaves))
    if extra:
      raise ConfigError(f"{sources[module]}/{extra[0]} has no place in byol_jax's {module}.")
    out[module] = {name: found[name].astype(spec.dtype, copy=False)
                   for name, spec in leaves.items()}
  return out


def check_model_config(model_config) -> None:
  """The reference pads as Haiku's "SAME"; byol_jax does so only when asked."""
  if model_config.padding != "haiku_same":
    raise ConfigError(f"DeepMind's checkpoints need Haiku's 'SAME' padding, but model.padding "
                      f"is {model_config.padding!r}: pass --config.model.padding=haiku_same.")


def _check_architecture(params, encoder: str, model_config) -> None:
  """Depth (from the encoder's name) and width (from the stem's channels) in one message."""
  depth = re.fullmatch(r"res_net(\d+)", encoder)
  stem_channels = params[f"{encoder}/~/initial_conv"]["w"].shape[-1]
  width, rest = divmod(stem_channels, model_config.base_channels)
  if depth and (int(depth[1]), width, rest) != (model_config.depth, model_config.width, 0):
    raise ConfigError(
        f"The checkpoint holds a ResNet-{depth[1]} ({encoder}) with {stem_channels} stem "
        f"channels but the config builds depth {model_config.depth}, width "
        f"{model_config.width}, base_channels {model_config.base_channels}: pass "
        f"--config.model.depth={depth[1]} --config.model.width={max(width, 1)}.")


class _Importer:
  """Renames and checks the reference's trees against the network `model_config` builds."""

  def __init__(self, online_params, model_config, dtype=jnp.float32):
    check_model_config(model_config)
    online_params = _plain(online_params, "online params")
    self.encoder = _encoder_name(online_params)
    _check_architecture(online_params, self.encoder, model_config)
    classifier = online_params.get("classifier")
    self.num_classes = int(classifier["w"].shape[1]) if classifier else 0
    online = networks.make_networks(model_config, max(self.num_classes, 1)).online
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), dtype)  # the dtype the tensors are cast to
    self.shapes = jax.eval_shape(lambda x: online.init(jax.random.PRNGKey(0), x, True), images)
    # Imported when the file has them; the encoder always must be there.
    present = {byol_jax_module(m, self.encoder) for m in online_params}
    self.modules = {m.split("/")[0] for m in present if m} | {ENCODER}
    self.describe = ", ".join(f"{f}={model_config[f]!r}"
                              for f in ("depth", "width", "base_channels"))

  def tree(self, tree, what: str, shapes: dict, modules=None) -> dict:
    """`tree`, a params-like tree of the reference, renamed to byol_jax's `modules`, checked."""
    modules = self.modules if modules is None else modules
    renamed, sources = _rename(_plain(tree, what), self.encoder, what)
    keep = lambda t: {m: dict(v) for m, v in t.items() if m.split("/")[0] in modules}
    return _check_and_cast(keep(renamed), sources, keep(shapes), what, self.describe)


def to_byol_jax(params, state, model_config, dtype=jnp.float32) -> Tuple[dict, dict, int]:
  """The reference's online (params, state) -> byol_jax's, and the probe's class count.

  Every tensor is checked against the network `model_config` builds. The
  projector, predictor and probe come along when the file has them.
  """
  importer = _Importer(params, model_config, dtype)
  return (importer.tree(params, "params", importer.shapes[0]),
          importer.tree(state, "state", importer.shapes[1]), importer.num_classes)


def _lars_momentum(opt_state):
  """`mu` of the reference's `ScaleByLarsState`, found by its class name in the chain's state."""
  for part in opt_state:
    if type(part).__name__ == "ScaleByLarsState":
      return part[0]
  raise ConfigError("The checkpoint's opt_state holds no ScaleByLarsState: it is not the "
                    "state of the reference's LARS.")


def to_train_state(experiment_state, step: int, model_config, optimizer, rng,
                   dtype=jnp.float32) -> TrainState:
  """The reference's whole `_ByolExperimentState` at `step` -> byol_jax's TrainState.

  The online and target networks (parameters and BatchNorm statistics) and the
  LARS momentum, every tensor checked as in `to_byol_jax`; `step` goes where
  byol_jax's schedules read it (`optim.lars_state`). The reference's target
  also holds a predictor and a classifier, which its loss never reads:
  byol_jax's target has neither, so they are left out. `optimizer` is
  `optim.make_optimizer`'s; `rng` the uint32[2] key of the new state; `dtype` that of
  every float tensor (float64 for parity runs under jax_enable_x64).
  """
  es = experiment_state
  importer = _Importer(es.online_params, model_config, dtype)
  params_shapes, state_shapes = importer.shapes
  target = set(networks.TARGET_MODULES)
  online_params = importer.tree(es.online_params, "online params", params_shapes)
  momentum = importer.tree(_lars_momentum(es.opt_state), "LARS momentum", params_shapes)
  return TrainState(
      step=jnp.asarray(step, jnp.int32), rng=jnp.asarray(rng, jnp.uint32),
      online_params=online_params,
      online_state=importer.tree(es.online_state, "online state", state_shapes),
      target_params=importer.tree(es.target_params, "target params", params_shapes, target),
      target_state=importer.tree(es.target_state, "target state", state_shapes, target),
      opt_state=optim.lars_state(optimizer, online_params, momentum, step))


_LARS_STATE = reference_pickle.record_type("ScaleByLarsState", ("mu",))
_NO_STATE = reference_pickle.record_type("EmptyState")


def from_train_state(state: TrainState, model_config):
  """byol_jax's TrainState -> the reference's `_ByolExperimentState` (numpy leaves).

  The inverse of `to_train_state` (the step is `state.step`); the target has
  no predictor or classifier, which byol_jax never keeps.
  """
  check_model_config(model_config)
  encoder = f"res_net{model_config.depth}"

  def tree(t, what):
    out = {}
    for module, leaves in _plain(t, what).items():
      ref = reference_module(module, encoder)
      if ref is None:
        raise ConfigError(f"byol_jax's {what} hold {module}, which the reference's network has "
                          "no place for: it builds BatchNorm ResNets with the ImageNet stem.")
      out[ref] = leaves
    return out

  momentum = tree(optim.lars_momentum(state.opt_state), "LARS momentum")
  return reference_pickle.EXPERIMENT_STATE(
      tree(state.online_params, "online params"), tree(state.target_params, "target params"),
      tree(state.online_state, "online state"), tree(state.target_state, "target state"),
      (_NO_STATE(), _LARS_STATE(momentum), _NO_STATE()))


def import_file(path: str, model_config) -> Imported:
  """Reads a released checkpoint and returns its online network in byol_jax's tree."""
  check_model_config(model_config)  # before reading gigabytes
  data = reference_pickle.load(path)
  experiment = data["experiment_state"]
  try:
    params, state = experiment.online_params, experiment.online_state
  except AttributeError:
    raise ConfigError(f"{path}: the experiment_state has no online_params / online_state; it "
                      "is not a BYOL pretraining checkpoint (pretrain_*.pkl).") from None
  params, state, num_classes = to_byol_jax(params, state, model_config)
  return Imported(params, state, int(data.get("step", 0)), num_classes)
