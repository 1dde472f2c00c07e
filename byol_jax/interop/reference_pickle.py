"""The restricted unpickler for DeepMind's released BYOL checkpoints (deepmind-research/byol).

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
"""

import builtins
import os
import pickle
from typing import Any, Dict, Tuple

import numpy as np

from byol_jax.errors import ConfigError

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]   # numpy's array reconstruction
_SCALAR = np.float32(0).__reduce__()[0]          # numpy's scalar reconstruction

class _Record(tuple):
  """Stand-in for a pickled NamedTuple: its values in order, fields by name if known."""
  _fields: Tuple[str, ...] = ()

  def __new__(cls, *values):
    return tuple.__new__(cls, values)

  def __getattr__(self, name):
    if name in type(self)._fields:
      return self[type(self)._fields.index(name)]
    raise AttributeError(name)


def record_type(name, fields=(), module=None) -> type:
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


EXPERIMENT_STATE = record_type(
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
    ("dill._dill", "_create_namedtuple"): record_type,
    ("dill._dill", "_create_array"): _dill_array,
    ("byol.byol_experiment", "_ByolExperimentState"): EXPERIMENT_STATE,
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
      return record_type(name)
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
      raise ConfigError(f"{path}: {e}") from None
    except (EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
      raise ConfigError(f"{path} is not a readable BYOL checkpoint ({type(e).__name__}: {e}); "
                        "download it again.") from None
  if not isinstance(data, dict) or "experiment_state" not in data:
    raise ConfigError(f"{path} holds no experiment_state: it is not a BYOL pretraining "
                      "checkpoint (deepmind-research/byol, pretrain_*.pkl).")
  return data
