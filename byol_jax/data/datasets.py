"""Data sources by kind: `load_source(config, split)` picks and builds one.

Four kinds of `config.data.source`:

* `"tfds"`: a TensorFlow Datasets dataset `data.name` under `data.data_dir`,
  read offline only (`tfds_source`). Small ones are read into memory as
  encoded bytes; larger ones (imagenet2012) are streamed.
* `"folder"`: `data.path` is a directory tree of images or a .zip of one
  (`folder_source`, whose docstring gives the layout rules).
* `"demo"`: the CIFAR-10 sample embedded in `byol_jax/assets/` (see its
  README), read through the folder/zip code, so demos run offline anywhere.
* `"npz"`: `data.path` is an .npz of equal-sized uint8 images
  (`array_source`); needs no TensorFlow.

What each returns, and the split strings, are in `sources`.
"""

import os
from typing import Optional

import numpy as np

from byol_jax.data import array_source, folder_source, tfds_source
from byol_jax.data.sources import (ArraySource, DataSourceError, StreamingSource, parse_split,
                                   slice_indices)
from byol_jax.tf_import import TensorFlowMissingError, import_tensorflow

DEMO_ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                          "cifar10_demo.zip")
CROP_ON_CHOICES = ("auto", "host", "device")
# What `--job=compile` needs of the splits the named configs train on, which it does not
# read: (source, TFDS name, split) -> (examples, classes, side of the stored images or 0
# where their sizes vary). Counts from the TFDS catalogue; the demo's from its asset README.
KNOWN_SPLITS = {
    ("tfds", "imagenet2012", "train"): (1_281_167, 1000, 0),
    ("tfds", "imagenet2012", "validation"): (50_000, 1000, 0),
    ("tfds", "cifar10", "train"): (50_000, 10, 32),
    ("tfds", "cifar10", "test"): (10_000, 10, 32),
    ("tfds", "stl10", "unlabelled"): (100_000, 10, 96),
    ("tfds", "stl10", "train"): (5_000, 10, 96),
    ("tfds", "stl10", "test"): (8_000, 10, 96),
    ("tfds", "imagenette/160px-v2", "train"): (9_469, 10, 0),
    ("tfds", "imagenette/160px-v2", "validation"): (3_925, 10, 0),
    ("demo", None, "train"): (3_600, 10, 32),
    ("demo", None, "test"): (900, 10, 32),
}


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------

def clear_source_cache() -> None:
  """Drops the sources kept for the run (zip maps, small TFDS splits held in memory).

  `load_source` is cached so that a job's many readers of one split share it;
  `jobs.run` clears the cache when the job ends, so nothing stays pinned after.
  """
  folder_source.folder_source.cache_clear()
  tfds_source.tfds_source.cache_clear()


def load_source(config, split: str):
  """The source for `split` under `config.data` (cached per process)."""
  data = config.data
  kind = data.source
  if kind == "npz":
    return array_source.npz_source(_required_path(data, "an .npz of uint8 images"), split)
  if kind not in ("demo", "folder", "tfds"):
    raise DataSourceError(
        f"Unknown data.source {kind!r}; use 'tfds', 'folder' (a directory or .zip), 'npz' "
        "(uint8 image arrays) or 'demo'.")
  on_device = crop_on_device(config)
  if kind == "tfds":
    source = tfds_source.tfds_source(data.name, data.data_dir, split)
  else:
    if kind == "demo":
      if not os.path.exists(DEMO_ASSET):
        raise DataSourceError(
            f"The embedded demo data {DEMO_ASSET} is missing; rebuild it with `python "
            "benchmarks/make_demo_assets.py` (needs ../shared/data) or reinstall byol_jax.")
      root = DEMO_ASSET
    else:
      root = _required_path(data, "a directory of images or a .zip of one")
    # With the crop on the device, PIL decodes (and so verifies) every image once anyway.
    verify = "none" if on_device else _verify_policy(data)
    source = folder_source.folder_source(root, split, verify)
  if not on_device:
    return source
  if isinstance(source, StreamingSource):
    raise DataSourceError(
        f"{source.description} is streamed (too large for memory), so its crop cannot run on the "
        "device; set --config.augment.crop_on=host.")
  return array_source.decoded(source)


def dataset_info(config, split: str) -> tuple:
  """(num_examples, num_classes) of a split; num_classes is 0 when unknown."""
  source = load_source(config, split)
  return source.num_examples, source.num_classes


def example_images(config, split: str, indices, max_side: int = 128):
  """The images at `indices` of `split` as uint8 [H, W, 3] arrays, as stored (no crop),
  shrunk to at most `max_side` pixels; None for a streamed source (no random access)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  source = load_source(config, split)
  if isinstance(source, StreamingSource):
    return None
  if isinstance(source, ArraySource):
    images = [Image.fromarray(source.images[int(i)]) for i in indices]
  else:
    paths, contents = source.fetch(np.asarray(indices, np.int64))
    images = [folder_source.pil_rgb(c or folder_source.read_file(p))
              for p, c in zip(paths, contents)]
  for image in images:
    image.thumbnail((max_side, max_side))
  return [np.asarray(image) for image in images]



def known_split_info(config, split: str) -> tuple:
  """(examples, classes, stored image side) of a split, without reading it: the
  config's data.num_train_examples / num_classes where set, else `KNOWN_SPLITS`."""
  data = config.data
  name = data.name if data.source == "tfds" else None
  examples, classes, side = KNOWN_SPLITS.get((data.source, name, split), (-1, -1, 0))
  if data.num_train_examples >= 0:
    examples = data.num_train_examples
  if data.num_classes >= 0:
    classes = data.num_classes
  if examples < 0 or classes < 0:
    what = f"data.source={data.source!r}" + (f" {data.name!r}" if name else "")
    raise DataSourceError(f"The size of {what} split {split!r} is not known without reading "
                          "it; set --config.data.num_train_examples and --config.data.num_classes.")
  return examples, classes, side


def known_split_size(config, split: str) -> Optional[int]:
  """Examples of `split` (a slice included) by `KNOWN_SPLITS`, without reading it; the
  training split's size is data.num_train_examples where set. None when not known."""
  name, start, stop = parse_split(split)
  data = config.data
  if split == data.train_split and data.num_train_examples >= 0:
    return int(data.num_train_examples)
  known = KNOWN_SPLITS.get((data.source, data.name if data.source == "tfds" else None, name))
  if known is None:
    return None
  return len(slice_indices(known[0], start, stop))


def crop_on_device(config, tensorflow: Optional[bool] = None) -> bool:
  """Whether the random resized crop runs inside the update step (on in-memory arrays).

  `config.augment.crop_on`: "device", "host" (tf.data), or "auto": the device
  for npz sources and whenever TensorFlow is missing, else the host.
  `tensorflow` says whether it is installed where the run happens (None: here).
  """
  choice = config.augment.crop_on
  if choice not in CROP_ON_CHOICES:
    raise DataSourceError(
        f"augment.crop_on must be one of {', '.join(CROP_ON_CHOICES)}, got {choice!r}.")
  if config.data.source == "npz":
    if choice == "host":
      raise DataSourceError("data.source='npz' holds decoded arrays, which are cropped on the "
                            "device; set --config.augment.crop_on=auto or device.")
    return True
  if choice != "auto":
    return choice == "device"
  if tensorflow is None:
    try:
      import_tensorflow()
      tensorflow = True
    except TensorFlowMissingError:
      tensorflow = False
  return not tensorflow


def _required_path(data, what: str) -> str:
  if not data.path:
    raise DataSourceError(
        f"data.source={data.source!r} needs data.path: {what}, e.g. "
        "--config.data.path=/data/my_images.")
  return os.path.abspath(os.path.expanduser(data.path))


def _verify_policy(data) -> str:
  policy = data.verify_images
  if policy not in ("auto", "all", "none"):
    raise DataSourceError(
        f"data.verify_images must be 'auto', 'all' or 'none', got {policy!r}.")
  return policy
