"""The stream's index arithmetic (pure numpy) and the checks every pipeline shares.

`input_pipeline`'s module docstring states the contract: stream position n
holds example order_e[n mod N] of epoch e = n // N, global batch k is
positions [k*B, (k+1)*B), and process p takes rows [p*B/P, (p+1)*B/P).
Every random choice of an example is seeded by (config.seed, tag, position,
view), so batch k depends only on (config, k).
"""

import functools

import numpy as np

from byol_jax.errors import ConfigError
from byol_jax.data import sources

# Stream tags keep the random streams of different uses independent.
TAG_PRETRAIN = 1
TAG_LINEAR = 2
TAG_ORDER = 3
TAG_SUBSET = 4
ENDLESS = 2**62  # "forever" for the stream of batch steps


def derive_seed(*parts: int) -> int:
  """A 31-bit seed that is a fixed function of the integers `parts`."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def local_batch_size(batch_size: int, process_count: int) -> int:
  """Rows per process; a clear error when the global batch does not divide."""
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}.")
  if batch_size % process_count:
    raise ConfigError(
        f"The global batch size {batch_size} does not divide by the {process_count} "
        f"processes; use a multiple of {process_count}, e.g. "
        f"{max(process_count, batch_size - batch_size % process_count)}.")
  return batch_size // process_count


def batch_positions(step: int, global_batch: int, process_index: int,
                    process_count: int) -> np.ndarray:
  """Global stream positions (int64) of this process's rows of global batch `step`."""
  local = global_batch // process_count
  return (np.int64(step) * global_batch + process_index * local
          + np.arange(local, dtype=np.int64))


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of the examples used in `epoch`."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_ORDER, epoch]))
  return rng.permutation(num_examples)


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a seed-fixed subset keeping `fraction` of every class (>= 1 each).

  This is the 1% / 10% semi-supervised protocol; unlabelled examples (-1) are
  never kept.
  """
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}.")
  labelled = np.flatnonzero(labels >= 0)
  if fraction == 1.0 or not len(labelled):
    return labelled
  rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_SUBSET]))
  keep = []
  for c in np.unique(labels[labelled]):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    keep.append(rng.choice(members, count, replace=False))
  return np.sort(np.concatenate(keep))


class StreamIndex:
  """Maps a global batch step to (positions, example ids) for one process."""

  def __init__(self, examples: np.ndarray, seed: int, global_batch: int,
               process_index: int, process_count: int):
    self.examples = examples  # ids of the examples that the stream cycles over
    self.seed = seed
    self.global_batch = global_batch
    self.process_index = process_index
    self.process_count = process_count
    self._order = functools.lru_cache(maxsize=4)(
        lambda epoch: epoch_order(len(examples), seed, epoch))

  def __call__(self, step: int):
    positions = batch_positions(step, self.global_batch, self.process_index, self.process_count)
    epochs, within = np.divmod(positions, len(self.examples))
    ids = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):  # usually one epoch, two at a boundary
      rows = epochs == epoch
      ids[rows] = self.examples[self._order(int(epoch))[within[rows]]]
    return positions, ids


def check_process(process_index: int, process_count: int, start_step: int = 0) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")


def train_examples(labels: np.ndarray, tag: int, label_fraction: float, seed: int,
                   description: str) -> np.ndarray:
  """Ids of the examples a training stream cycles over: all of them for
  pretraining, the (class-balanced subset of) labelled ones for linear training."""
  if label_fraction >= 1.0 and tag != TAG_LINEAR:
    return np.arange(len(labels))
  examples = class_balanced_subset(labels, label_fraction, seed)
  if not len(examples):
    raise sources.DataSourceError(
        f"{description} has no labelled examples, so there is nothing to train a classifier "
        "on; use a split with class sub-folders / labels.")
  return examples


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def crop_seeds(seed: int, tag: int, num_views: int, positions: np.ndarray) -> np.ndarray:
  """uint32 [len(positions), num_views, 2]: one threefry key per example and view,
  a fixed function of (seed, tag, stream position, view); distinct positions
  get distinct keys."""
  positions = np.asarray(positions, np.int64).astype(np.uint64)
  views = []
  for v in range(num_views):
    base = _mix64(np.asarray([derive_seed(seed, tag, v)], np.uint64))
    views.append(_mix64(positions ^ base))
  keys = np.stack(views, axis=1)
  return np.stack([keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF)], -1).astype(np.uint32)


def eval_rows(step: int, num_examples: int, batch_size: int, process_index: int,
              process_count: int):
  """(positions, example ids, mask) of this process's rows of evaluation batch `step`:
  the split in order, padding rows (mask False, id 0) past its end."""
  positions = batch_positions(step, batch_size, process_index, process_count)
  mask = positions < num_examples
  return positions, np.where(mask, positions, 0), mask


def eval_crop_fraction(config) -> float:
  fraction = float(config.data.eval_crop_fraction)
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"data.eval_crop_fraction must be in (0, 1], got {fraction}.")
  return fraction
