"""The types every data source returns, and the split strings they all accept.

Each split becomes one of three source types:

* `RandomAccessSource`: encoded images addressable by index, augmented on the
  host by tf.data (needs TensorFlow).
* `StreamingSource`: a TFDS split too large for memory, read in file order.
* `ArraySource`: equal-sized decoded uint8 images in memory. The host only
  gathers rows; the random resized crop and flip run on the device, inside the
  update step (`views.device_crop`). Every npz source is one; folder, demo and
  small TFDS sources become one (decoded once with PIL) when
  `config.augment.crop_on` says the crop runs on the device
  (`datasets.crop_on_device`).

Split strings (`data.train_split` etc.) look like TFDS ones: a name and an
optional slice, e.g. `"train"`, `"train[:5000]"`, `"train[10%:]"`. A slice
takes its share of a fixed pseudo-random order (independent of `config.seed`),
so `train[:10%]` mixes classes and `train[:10%]` / `train[10%:]` never overlap;
the selected examples keep their original order.

The source modules (`folder_source`, `tfds_source`, `array_source`) import this
one; `datasets` picks among them.
"""

import dataclasses
import re
from typing import Callable, Optional

import numpy as np

from byol_jax.errors import DataSourceError  # noqa: F401 - the source modules raise it

# Fixed seed of the order that split slices cut (never config.seed: a val slice
# must stay disjoint from its train complement whatever seed a run uses).
_SLICE_ORDER_SEED = 20200613


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
  names: tuple = ()          # each example's file name (folder, zip, demo); () when none
  skipped_names: tuple = ()  # the files skipped as undecodable

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass
class StreamingSource:
  """A split too large to hold in memory, read in file order, sharded by process.

  The interface; TFDS implements it (`tfds_source.TfdsStream`).
  """
  description: str
  num_examples: int
  num_classes: int

  def process_split(self, process_index: int, process_count: int) -> str:
    """This process's disjoint share of the split (all shares cover it)."""
    raise NotImplementedError

  def split_size(self, split: str) -> int:
    raise NotImplementedError

  def read(self, split: str):
    """tf.data of (encoded image, int32 label) for a (sub-)split, in file order."""
    raise NotImplementedError


@dataclasses.dataclass
class ArraySource:
  """Equal-sized decoded images in memory; the device crops them (`device_crop`)."""
  description: str
  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N], -1 where unlabelled
  num_classes: int
  class_names: tuple = ()
  num_skipped: int = 0
  names: tuple = ()          # as RandomAccessSource's, for the images kept
  skipped_names: tuple = ()

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


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
