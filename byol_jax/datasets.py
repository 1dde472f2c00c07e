"""Data sources: where images and labels come from, and in which form.

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

Each split becomes one of three source types:

* `RandomAccessSource`: encoded images addressable by index, augmented on the
  host by tf.data (needs TensorFlow).
* `StreamingSource`: a TFDS split too large for memory, read in file order.
* `ArraySource`: equal-sized decoded uint8 images in memory. The host only
  gathers rows; the random resized crop and flip run on the device, inside the
  update step (`device_crop`). Every npz source is one; folder, demo and small
  TFDS sources become one (decoded once with PIL) when
  `config.augment.crop_on` says the crop runs on the device (`crop_on_device`).

Split strings (`data.train_split` etc.) look like TFDS ones: a name and an
optional slice, e.g. `"train"`, `"train[:5000]"`, `"train[10%:]"`. A slice
takes its share of a fixed pseudo-random order (independent of `config.seed`),
so `train[:10%]` mixes classes and `train[:10%]` / `train[10%:]` never overlap;
the selected examples keep their original order.
"""

import dataclasses
import os
import re
from typing import Callable, Optional

import numpy as np

from byol_jax.tf_import import TensorFlowMissingError, import_tensorflow

DEMO_ASSET = os.path.join(os.path.dirname(__file__), "assets", "cifar10_demo.zip")
CROP_ON_CHOICES = ("auto", "host", "device")
# Fixed seed of the order that split slices cut (never config.seed: a val slice
# must stay disjoint from its train complement whatever seed a run uses).
_SLICE_ORDER_SEED = 20200613


class DataSourceError(ValueError):
  """A data source cannot be read as configured; the message says how to fix it."""


# ----------------------------------------------------------------------------
# Source types.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class RandomAccessSource:
  """Encoded examples addressable by index (folder, zip, demo, small TFDS).

  `fetch(indices)` returns (paths, contents): object arrays of bytes. A row's
  image is `contents` when non-empty, else the file at `paths` (read by TF in
  parallel inside the pipeline, so directory trees need not fit in memory).
  """
  description: str
  labels: np.ndarray  # int32 [N], -1 where unlabelled
  num_classes: int
  fetch: Callable[[np.ndarray], tuple]
  verified: bool      # every example decoded once already, so run time cannot fail
  num_skipped: int = 0
  class_names: tuple = ()

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass
class StreamingSource:
  """A TFDS split too large to hold in memory; read in file order, sharded by process."""
  description: str
  builder: object
  split: str
  num_examples: int
  num_classes: int

  def process_split(self, process_index: int, process_count: int) -> str:
    """This process's disjoint share of the split (all shares cover it)."""
    from byol_jax import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.import_tfds().even_splits(self.split, n=process_count)[process_index]

  def split_size(self, split: str) -> int:
    return int(self.builder.info.splits[split].num_examples)

  def read(self, split: str):
    """tf.data of (encoded image, int32 label) for a (sub-)split, in file order."""
    from byol_jax import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.read_split(self.builder, split)


@dataclasses.dataclass
class ArraySource:
  """Equal-sized decoded images in memory; the device crops them (`device_crop`)."""
  description: str
  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N], -1 where unlabelled
  num_classes: int
  class_names: tuple = ()
  num_skipped: int = 0

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------

def clear_source_cache() -> None:
  """Drops the sources kept for the run (zip maps, small TFDS splits held in memory).

  `load_source` is cached so that a job's many readers of one split share it;
  `jobs.run` clears the cache when the job ends, so nothing stays pinned after.
  """
  from byol_jax import folder_source, tfds_source  # pylint: disable=g-import-not-at-top
  folder_source.folder_source.cache_clear()
  tfds_source.tfds_source.cache_clear()


def load_source(config, split: str):
  """The source for `split` under `config.data` (cached per process)."""
  # The source modules import the types above, so they are imported here.
  # pylint: disable-next=g-import-not-at-top
  from byol_jax import array_source, folder_source, tfds_source
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


def crop_on_device(config) -> bool:
  """Whether the random resized crop runs inside the update step (on in-memory arrays).

  `config.augment.crop_on`: "device", "host" (tf.data), or "auto": the device
  for npz sources and whenever TensorFlow is missing, else the host.
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
  try:
    import_tensorflow()
  except TensorFlowMissingError:
    return True
  return False


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


# ----------------------------------------------------------------------------
# Split strings.
# ----------------------------------------------------------------------------

_SPLIT_RE = re.compile(r"^\s*([^\[\]\s]+)\s*(?:\[\s*([^\]:]*)\s*:\s*([^\]]*)\s*\])?\s*$")


def parse_split(split: str):
  """'train[10%:]' -> ('train', '10%', ''); 'test' -> ('test', None, None)."""
  match = _SPLIT_RE.match(split or "")
  if not match:
    raise DataSourceError(
        f"Cannot parse the split {split!r}; use a name with an optional slice, "
        "e.g. 'train', 'train[:5000]' or 'train[10%:]'.")
  return match.group(1), match.group(2), match.group(3)


def _slice_bound(text: Optional[str], n: int, default: int) -> int:
  if text is None or text == "":
    return default
  if text.endswith("%"):
    value = round(n * float(text[:-1]) / 100.0)
  else:
    value = int(text)
  if value < 0:
    value += n
  return min(max(value, 0), n)


def slice_indices(n: int, start, stop) -> np.ndarray:
  """Indices (sorted) of a slice taken from the fixed shuffled order of n items."""
  if start is None and stop is None:
    return np.arange(n)
  lo, hi = _slice_bound(start, n, 0), _slice_bound(stop, n, n)
  order = np.random.default_rng(_SLICE_ORDER_SEED).permutation(n)
  return np.sort(order[lo:hi])
