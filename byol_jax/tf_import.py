"""The one place TensorFlow is imported: lazily, and hidden from accelerators.

Only the tf.data input of image files and TFDS needs TensorFlow; training on
in-memory arrays, the update step and the jobs run without it installed.
"""

import sys

from byol_jax.errors import MissingDependencyError

# TF's `__init__` eagerly imports Keras's optimizers (to register them for
# SavedModels, which byol_jax never loads), tolerating an ImportError: 1.5-3
# CPU-seconds of every process that reads files. Keras stays importable after.
_KERAS_PACKAGES = ("keras", "tf_keras")


class TensorFlowMissingError(MissingDependencyError):
  """TensorFlow is needed for what was asked but is not installed."""


def _import_without_keras():
  blocked = [name for name in _KERAS_PACKAGES if name not in sys.modules]
  for name in blocked:
    sys.modules[name] = None  # makes `import keras` raise ImportError
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf
  except ImportError:
    pass  # a TF that needs Keras after all, or none: the plain import below says which
  finally:
    for name in blocked:
      del sys.modules[name]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def import_tensorflow():
  """Returns the `tensorflow` module with every accelerator hidden from it.

  TF is imported lazily (it costs seconds) and must never take GPU/TPU memory
  that JAX needs; the input pipeline only runs CPU ops.
  """
  try:
    tf = sys.modules.get("tensorflow") or _import_without_keras()
  except ImportError as e:
    raise TensorFlowMissingError(
        f"TensorFlow is not installed ({e}); reading image files and TFDS datasets needs it "
        "(pip install tensorflow-cpu tensorflow-datasets), or train on in-memory arrays "
        "(--config.data.source=npz or demo).") from None
  if not getattr(import_tensorflow, "_done", False):
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
      # Devices were already initialised (someone used TF first) or this build
      # has no such device type; either way there is nothing left to hide.
      pass
    import_tensorflow._done = True
  return tf
