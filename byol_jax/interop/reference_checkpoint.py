"""DeepMind's released BYOL checkpoints (deepmind-research/byol) as byol_jax parameters.

The reference saves `dict(experiment_state=_ByolExperimentState(online_params,
target_params, online_state, target_state, opt_state), step=..., rng=...)` with
dill at pickle protocol 2, after `jax.device_get`: numpy arrays inside Haiku's
mapping type of the time (`FlatMapping`, `frozendict` before it, `FlatMap`
after). dill writes NamedTuple classes as calls of `dill._dill._create_namedtuple`
(and, in some processes, arrays through `dill._dill._create_array`).

`load` reads such a file with an unpickler that admits only these containers,
as plain stand-ins (nothing of dill, Haiku, optax or the reference is imported),
and numpy's array reconstruction. Any other global is refused before it is
looked up, so a file cannot make the load run code.

`to_byol_jax` renames the reference's modules (hk.nets.ResNet's names under
`res_net50`, `res_net200`, ...; its MLPs `projector` and `predictor`; the online
`classifier`, which becomes byol_jax's `probe`) and checks every shape against
byol_jax's network. hk.nets.ResNet's bottleneck blocks (v1, stride on the 3x3,
a projection shortcut in every stage's first block) are byol_jax's; its "SAME"
padding needs `model.padding="haiku_same"`.
"""

import builtins
import os
import pickle
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.model import networks

ENCODER = "encoder"
# Imported when the file has them; the encoder always must be there.
_OPTIONAL = ("projector", "predictor", "probe")
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]   # numpy's array reconstruction
_SCALAR = np.float32(0).__reduce__()[0]          # numpy's scalar reconstruction


# --------------------------------------------------------------------------- #
# The restricted unpickler
# --------------------------------------------------------------------------- #


class _Record(tuple):
  """Stand-in for a pickled NamedTuple: its values in order, fields by name if known."""
  _fields: Tuple[str, ...] = ()

  def __new__(cls, *values):
    return tuple.__new__(cls, values)

  def __getattr__(self, name):
    if name in type(self)._fields:
      return self[type(self)._fields.index(name)]
    raise AttributeError(name)


def _record_type(name, fields=(), module=None) -> type:
  """A `_Record` class; also stands in for dill's `_create_namedtuple(name, fields, module)`."""
  del module  # never imported
  if not isinstance(name, str) or not all(isinstance(f, str) for f in fields):
    raise pickle.UnpicklingError(f"Malformed NamedTuple {name!r} {fields!r} in the pickle.")
  return type(name, (_Record,), {"_fields": tuple(fields)})


def _dtype(*args) -> np.dtype:
  dtype = np.dtype(*args)
  if dtype.hasobject:  # object arrays would hold arbitrary pickled objects
    raise pickle.UnpicklingError(f"Refusing an array of dtype {dtype}: checkpoints hold numbers.")
  return dtype


def _scalar(dtype, *data):
  return _SCALAR(_dtype(dtype), *data)


def _latin1(text, encoding="latin1") -> bytes:
  """Protocol 2 writes bytes as `_codecs.encode(text, "latin1")`."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"Refusing _codecs.encode({type(text).__name__}, {encoding!r}).")
  return text.encode("latin1")


def _dill_array(reconstruct, args, state, npdict=None) -> np.ndarray:
  """dill's `_create_array`: numpy's reconstruction, then its state; no subclass attributes."""
  if reconstruct is not _RECONSTRUCT or npdict:
    raise pickle.UnpicklingError("Refusing a dill array that is not a plain numpy array.")
  array = _RECONSTRUCT(*args)
  array.__setstate__(state)
  return array


_EXPERIMENT_STATE = _record_type(
    "_ByolExperimentState",
    ("online_params", "target_params", "online_state", "target_state", "opt_state"))

_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x, 2.x
_ADMITTED = {
    **{(m, "_reconstruct"): _RECONSTRUCT for m in _NUMPY_MULTIARRAY},
    **{(m, "scalar"): _scalar for m in _NUMPY_MULTIARRAY},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
    **{("builtins", n): getattr(builtins, n)
       for n in ("bytes", "bytearray", "complex", "dict", "frozenset", "list", "set", "tuple")},
    ("collections", "OrderedDict"): dict,
    **{("haiku._src.data_structures", n): dict for n in ("FlatMapping", "FlatMap", "frozendict")},
    ("dill._dill", "_create_namedtuple"): _record_type,
    ("dill._dill", "_create_array"): _dill_array,
    ("byol.byol_experiment", "_ByolExperimentState"): _EXPERIMENT_STATE,
}


class _Unpickler(pickle.Unpickler):
  """Admits the globals in `_ADMITTED` and the reference's / optax's state NamedTuples."""

  def find_class(self, module, name):
    # Overriding find_class skips pickle's own renaming of Python 2 names (protocol 2).
    module = "builtins" if module == "__builtin__" else module
    if (module, name) in _ADMITTED:
      return _ADMITTED[(module, name)]
    # Optimizer states (byol.utils.optimizers.ScaleByLarsState, optax's ...State):
    # positional records, never used here.
    if module.split(".")[0] in ("byol", "optax") and name.endswith("State"):
      return _record_type(name)
    raise pickle.UnpicklingError(
        f"Refusing to load the pickled global {module}.{name}: a BYOL checkpoint holds only "
        "numpy arrays in containers, so this file is not one (or has been tampered with).")


def load(path: str) -> Dict[str, Any]:
  """The whole checkpoint: {"experiment_state": record, "step": int, "rng": array}."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No file {path}: download a released checkpoint first, e.g. "
                            "https://storage.googleapis.com/deepmind-byol/checkpoints/"
                            "pretrain_res50x1.pkl.")
  with open(path, "rb") as f:
    try:
      data = _Unpickler(f).load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: {e}") from None
    except (EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
      raise ValueError(f"{path} is not a readable BYOL checkpoint ({type(e).__name__}: {e}); "
                       "download it again.") from None
  if not isinstance(data, dict) or "experiment_state" not in data:
    raise ValueError(f"{path} holds no experiment_state: it is not a BYOL pretraining "
                     "checkpoint (deepmind-research/byol, pretrain_*.pkl).")
  return data


# --------------------------------------------------------------------------- #
# Module names: hk.nets.ResNet and the reference's MLPs -> byol_jax
# --------------------------------------------------------------------------- #

_layer = lambda m: f"layer{int(m[1]) + 1}_{int(m[2])}"
_BLOCK = r"block_group_(\d+)/~/block_(\d+)/~/"
# Below "<encoder>/~/": (hk.nets.ResNet module, byol_jax module below "encoder/").
_ENCODER_RENAMES = (
    (r"initial_conv", lambda m: "conv1"),
    (r"initial_batchnorm", lambda m: "bn1/bn"),
    (_BLOCK + r"conv_(\d+)", lambda m: f"{_layer(m)}/conv{int(m[3]) + 1}"),
    (_BLOCK + r"batchnorm_(\d+)", lambda m: f"{_layer(m)}/bn{int(m[3]) + 1}/bn"),
    (_BLOCK + r"shortcut_conv", lambda m: f"{_layer(m)}/downsample_conv"),
    (_BLOCK + r"shortcut_batchnorm", lambda m: f"{_layer(m)}/downsample_norm/bn"),
)
# The reference's MLP makes its layers inside __call__, hence Haiku's default names.
_MLP_RENAMES = {"linear": "linear1", "batch_norm": "bn", "linear_1": "linear2"}


def byol_jax_module(module: str, encoder: str) -> Optional[str]:
  """e.g. "res_net50/~/block_group_1/~/block_0/~/batchnorm_2/~/mean_ema" ->
  "encoder/layer2_0/bn3/bn/~/mean_ema"; None for a module byol_jax has no place for."""
  base, ema = re.fullmatch(r"(.*?)((?:/~/(?:mean|var)_ema)?)", module).groups()
  top, _, rest = base.partition("/")
  if top == encoder and rest.startswith("~/"):
    for pattern, rename in _ENCODER_RENAMES:
      m = re.fullmatch(pattern, rest[2:])
      if m:
        return f"{ENCODER}/{rename(m)}{ema}"
  if top in ("projector", "predictor") and rest in _MLP_RENAMES:
    return f"{top}/{_MLP_RENAMES[rest]}{ema}"
  if base == "classifier":
    return f"probe{ema}"
  return None


def _encoder_name(params) -> str:
  names = sorted({m[:-len("/~/initial_conv")] for m in params if m.endswith("/~/initial_conv")})
  if len(names) != 1:
    raise ValueError(f"Expected one ResNet encoder (a '<name>/~/initial_conv' module) in the "
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
    raise ValueError(f"The checkpoint's {what} are not a Haiku tree of arrays.") from None


def _rename(tree: dict, encoder: str, what: str) -> Tuple[dict, Dict[str, str]]:
  """(tree under byol_jax's module names, {byol_jax module: the file's module})."""
  renamed, sources = {}, {}
  for module, leaves in tree.items():
    new = byol_jax_module(module, encoder)
    if new is None:
      raise ValueError(f"The checkpoint's {what} hold {module}, which byol_jax's network has "
                       "no place for: it is not a ResNet-50/101/152/200 BYOL checkpoint.")
    renamed[new], sources[new] = leaves, module
  return renamed, sources


def _check_and_cast(tree: dict, sources: dict, expected: dict, what: str, describe: str) -> dict:
  """`tree` with exactly `expected`'s modules, leaves and shapes, in its dtypes."""
  hint = ("pass the model config the file was trained with (pretrain_res200x2.pkl: "
          "--config.model.depth=200 --config.model.width=2)")
  unexpected = sorted(set(tree) - set(expected))
  if unexpected:
    raise ValueError(f"The checkpoint's {what} hold {sources[unexpected[0]]} (byol_jax's "
                     f"{unexpected[0]}), which byol_jax's network ({describe}) lacks: {hint}.")
  out = {}
  for module, leaves in expected.items():
    found = tree.get(module, {})
    for name, spec in leaves.items():
      if name not in found:
        raise ValueError(f"The checkpoint's {what} have no tensor for byol_jax's "
                         f"{module}/{name} (shape {spec.shape}): the file is incomplete or "
                         "not a BYOL checkpoint.")
      if found[name].shape != spec.shape:
        raise ValueError(f"{sources[module]}/{name} has shape {found[name].shape} but byol_jax's "
                         f"{module}/{name} ({describe}) has {spec.shape}: {hint}.")
    extra = sorted(set(found) - set(leaves))
    if extra:
      raise ValueError(f"{sources[module]}/{extra[0]} has no place in byol_jax's {module}.")
    out[module] = {name: found[name].astype(spec.dtype) for name in leaves}
  return out


def check_model_config(model_config) -> None:
  """The reference pads as Haiku's "SAME"; byol_jax does so only when asked."""
  if model_config.padding != "haiku_same":
    raise ValueError(f"DeepMind's checkpoints need Haiku's 'SAME' padding, but model.padding "
                     f"is {model_config.padding!r}: pass --config.model.padding=haiku_same.")


def _check_architecture(params, encoder: str, model_config) -> None:
  """Depth (from the encoder's name) and width (from the stem's channels) in one message."""
  depth = re.fullmatch(r"res_net(\d+)", encoder)
  stem_channels = params[f"{encoder}/~/initial_conv"]["w"].shape[-1]
  width, rest = divmod(stem_channels, model_config.base_channels)
  if depth and (int(depth[1]), width, rest) != (model_config.depth, model_config.width, 0):
    raise ValueError(
        f"The checkpoint holds a ResNet-{depth[1]} ({encoder}) with {stem_channels} stem "
        f"channels but the config builds depth {model_config.depth}, width "
        f"{model_config.width}, base_channels {model_config.base_channels}: pass "
        f"--config.model.depth={depth[1]} --config.model.width={max(width, 1)}.")


def to_byol_jax(params, state, model_config) -> Tuple[dict, dict, int]:
  """The reference's online (params, state) -> byol_jax's, and the probe's class count.

  Every tensor is checked against the network `model_config` builds. The
  projector, predictor and probe come along when the file has them.
  """
  check_model_config(model_config)
  params, state = _plain(params, "online params"), _plain(state, "online state")
  encoder = _encoder_name(params)
  _check_architecture(params, encoder, model_config)
  (params, param_sources), (state, state_sources) = (
      _rename(params, encoder, "params"), _rename(state, encoder, "state"))
  num_classes = int(params["probe"]["w"].shape[1]) if "probe" in params else 0
  online = networks.make_networks(model_config, max(num_classes, 1)).online
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: online.init(jax.random.PRNGKey(0), x, True), images)
  present = {m.split("/")[0] for m in params}
  keep = lambda tree: {m: dict(v) for m, v in tree.items()
                       if m.split("/")[0] not in _OPTIONAL or m.split("/")[0] in present}
  describe = ", ".join(f"{f}={model_config[f]!r}" for f in ("depth", "width", "base_channels"))
  return (_check_and_cast(params, param_sources, keep(shapes[0]), "params", describe),
          _check_and_cast(state, state_sources, keep(shapes[1]), "state", describe), num_classes)


def import_file(path: str, model_config) -> Imported:
  """Reads a released checkpoint and returns its online network in byol_jax's tree."""
  check_model_config(model_config)  # before reading gigabytes
  data = load(path)
  experiment = data["experiment_state"]
  try:
    params, state = experiment.online_params, experiment.online_state
  except AttributeError:
    raise ValueError(f"{path}: the experiment_state has no online_params / online_state; it "
                     "is not a BYOL pretraining checkpoint (pretrain_*.pkl).") from None
  params, state, num_classes = to_byol_jax(params, state, model_config)
  return Imported(params, state, int(data.get("step", 0)), num_classes)
