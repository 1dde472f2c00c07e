r"""BYOL on your own images: a folder (or .zip) of JPEG/PNG files.

  python -m byol_jax.main --config=custom_folder --workdir=runs/mine \
      --config.data.path=/path/to/images

Class sub-folders, if present, give labels for the probe, kNN and linear
evaluation; without them the run is purely self-supervised. A top-level
`train/` (and `test/`) sub-folder, if present, is used for the splits.
"""

from byol_jax.configs import base


def get_config():
  c = base.get_small_images_config()
  c.epochs = 300.0
  c.data.source = "folder"
  c.data.path = None                  # required: --config.data.path=...
  c.data.train_split = "train"
  c.data.val_split = "train"
  c.data.test_split = "test"
  c.data.image_size = 224
  c.eval.every_steps = 2000
  return c
