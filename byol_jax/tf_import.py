"""The one place TensorFlow is imported: lazily, and hidden from accelerators.

Only the tf.data input of image files and TFDS needs TensorFlow; training on
in-memory arrays, the update step and the jobs run without it installed.
"""


from byol_jax.errors import MissingDependencyError


class TensorFlowMissingError(MissingDependencyError):
  """TensorFlow is needed for what was asked but is not installed."""


def import_tensorflow():
  """Returns the `tensorflow` module with every accelerator hidden from it.

  TF is imported lazily (it costs seconds) and must never take GPU/TPU memory
  that JAX needs; the input pipeline only runs CPU ops.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
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
