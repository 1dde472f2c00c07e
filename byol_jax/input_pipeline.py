"""tf.data input pipelines that yield this process's numpy rows of each global batch.

The stream
----------
Pretraining (and linear-eval training) reads an endless stream of examples:
stream position n (0, 1, 2, ...) holds example `order_e[n mod N]` of epoch
e = n // N, where order_e is a permutation of the N examples seeded by
(config.seed, e). Global batch k is positions [k*B, (k+1)*B); process p of P
takes rows [p*B/P, (p+1)*B/P) of it. Every host-side random choice (crop
windows, flips) of an example is a stateless TF op seeded by (config.seed,
its stream position, its view). Hence, for random-access sources:

* batch k depends only on (config, k): starting at `start_step=s` yields
  exactly batches s, s+1, ... of a run started at 0, computed by index
  arithmetic (nothing is decoded and thrown away);
* the global batch is the same whatever the process count, and the
  processes' rows are disjoint and together cover it.

Streaming TFDS sources (too large for memory, e.g. imagenet2012) cannot be
permuted globally: each process reads its own `tfds.even_splits` share in
file order, shuffled per epoch by a buffer of `data.shuffle_buffer` examples
seeded by (config.seed, epoch), and its rows of batch k are its local stream
positions [k*b, (k+1)*b) (b = B/P); augmentation seeds still use the global
position k*B + p*b + row. Resuming skips (reads, does not decode) the part of
the current epoch already consumed: at most one epoch of encoded records.

Host/device split: the host decodes, crops, resizes and flips and ships uint8
views; colour jitter, grayscale, blur and solarize run on the device inside
the update step (`augment.device_augment`).
"""

import functools
import math
from typing import Iterator

import numpy as np
from absl import logging

from byol_jax import augment, datasets

# Stream tags keep the random streams of different uses independent.
_TAG_PRETRAIN = 1
_TAG_LINEAR = 2
_TAG_ORDER = 3
_TAG_SUBSET = 4
_ENDLESS = 2**62


# ----------------------------------------------------------------------------
# Index arithmetic (pure numpy, shared by every random-access pipeline).
# ----------------------------------------------------------------------------

def derive_seed(*parts: int) -> int:
  """A 31-bit seed that is a fixed function of the integers `parts`."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def local_batch_size(batch_size: int, process_count: int) -> int:
  """Rows per process; a clear error when the global batch does not divide."""
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}.")
  if batch_size % process_count:
    raise ValueError(
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
  rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_ORDER, epoch]))
  return rng.permutation(num_examples)


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a seed-fixed subset keeping `fraction` of every class (>= 1 each).

  This is the 1% / 10% semi-supervised protocol; unlabelled examples (-1) are
  never kept.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"label_fraction must be in (0, 1], got {fraction}.")
  labelled = np.flatnonzero(labels >= 0)
  if fraction == 1.0 or not len(labelled):
    return labelled
  rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SUBSET]))
  keep = []
  for c in np.unique(labels[labelled]):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    keep.append(rng.choice(members, count, replace=False))
  return np.sort(np.concatenate(keep))


class _StreamIndex:
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


# ----------------------------------------------------------------------------
# tf.data building blocks.
# ----------------------------------------------------------------------------

def _options():
  tf = augment.import_tensorflow()
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op: parallelism comes from tf.data's parallel map, and
  # intra-op threads would oversubscribe the cores it already uses.
  options.threading.max_intra_op_parallelism = 1
  return options


def _rows_dataset(rows_fn, start_step: int, stop_step: int, local: int, with_mask: bool):
  """tf.data of single rows from a numpy function of the batch step.

  `rows_fn(step)` returns (positions, labels, paths, contents[, mask]) for this
  process's rows of `step`. Python runs once per batch, never per image.
  """
  tf = augment.import_tensorflow()
  types = [tf.int64, tf.int32, tf.string, tf.string] + ([tf.bool] if with_mask else [])

  def load(step):
    out = tf.numpy_function(rows_fn, [step], types, stateful=False)
    for t in out:
      t.set_shape([local])
    return tuple(out)

  ds = tf.data.Dataset.range(start_step, stop_step)
  ds = ds.map(load, num_parallel_calls=2, deterministic=True)
  return ds.unbatch()


def _finish(ds, local: int, prefetch: int, drop_errors: bool):
  """Batches, prefetches and applies the pipeline options."""
  tf = augment.import_tensorflow()
  if drop_errors:
    # Only for sources too large to verify at start-up: an undecodable file
    # is dropped (and logged by TF) instead of killing the run.
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(max(1, int(prefetch)) if prefetch else tf.data.AUTOTUNE)
  return ds.with_options(_options())


def _views_fn(config, view_configs, tag: int, keys):
  """Per-example map: encoded image -> host views named `keys`, seeded by position."""
  tf = augment.import_tensorflow()
  size = int(config.data.image_size)
  view_seeds = [derive_seed(config.seed, tag, v) for v in range(len(view_configs))]
  view_configs = tuple(dict(crop_area=tuple(c["crop_area"]), crop_aspect=tuple(c["crop_aspect"]),
                            flip_prob=float(c["flip_prob"])) for c in view_configs)

  def fn(position, label, path, contents):
    contents = datasets.read_contents(path, contents)
    seeds = tf.stack([tf.stack([tf.constant(s, tf.int64), position]) for s in view_seeds])
    views = augment.random_resized_views(contents, seeds, view_configs, size)
    out = {k: views[v] for v, k in enumerate(keys)}
    out["label"] = label
    return out

  return fn


def _train_dataset(config, view_configs, keys, tag: int, *, batch_size: int, start_step: int,
                   process_index: int, process_count: int, label_fraction: float = 1.0):
  """The endless augmented stream for pretraining or linear training."""
  local = local_batch_size(batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  source = datasets.load_source(config, config.data.train_split)
  example_fn = _views_fn(config, view_configs, tag, keys)

  if isinstance(source, datasets.StreamingSource):
    return _streaming_train(config, source, example_fn, local, batch_size, start_step,
                            process_index, process_count, label_fraction)

  if label_fraction < 1.0 or tag == _TAG_LINEAR:
    examples = class_balanced_subset(source.labels, label_fraction, config.seed)
    if not len(examples):
      raise datasets.DataSourceError(
          f"{source.description} has no labelled examples, so there is nothing to train a "
          "classifier on; use a split with class sub-folders / labels.")
  else:
    examples = np.arange(source.num_examples)
  index = _StreamIndex(examples, config.seed, batch_size, process_index, process_count)

  def rows(step):
    positions, ids = index(int(step))
    paths, contents = source.fetch(ids)
    return positions, source.labels[ids], paths, contents

  ds = _rows_dataset(rows, start_step, _ENDLESS, local, with_mask=False)
  tf = augment.import_tensorflow()
  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, local, config.data.prefetch_batches, drop_errors=not source.verified)


def _streaming_train(config, source, example_fn, local, global_batch, start_step,
                     process_index, process_count, label_fraction):
  tf = augment.import_tensorflow()
  split = source.process_split(process_index, process_count)
  base = source.read(split)
  shuffle_seed = derive_seed(config.seed, _TAG_ORDER, process_index)
  first = start_step * local  # this process's local stream position to start at
  if label_fraction < 1.0:
    # No global view of the labels: keep each example with probability
    # label_fraction by a seeded hash of its first bytes (class-balanced in
    # expectation), and resume by skipping from the start of the stream.
    key = derive_seed(config.seed, _TAG_SUBSET)
    threshold = int(label_fraction * 2**31)

    def keep(image, label):
      head = tf.strings.join([str(key), tf.strings.substr(image, 0, 4096)])
      return (label >= 0) & (tf.strings.to_hash_bucket_fast(head, 2**31) < threshold)

    base = base.filter(keep)
    first_epoch, skip = 0, first
    logging.warning("%s: label_fraction %.3g on a streaming source keeps a hashed, "
                    "approximately class-balanced subset.", source.description, label_fraction)
  else:
    first_epoch, skip = divmod(first, source.split_size(split))

  def epoch(e):
    return base.shuffle(config.data.shuffle_buffer, seed=shuffle_seed + e * 1_000_003,
                        reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(epoch).skip(skip)
  ds = ds.enumerate(start=first)

  def with_position(t, example):
    image, label = example
    position = (t // local) * global_batch + process_index * local + t % local
    return example_fn(position, label, tf.constant(b""), image)

  ds = ds.map(with_position, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, local, config.data.prefetch_batches, drop_errors=False)


def _eval_fn(config):
  tf = augment.import_tensorflow()
  size = int(config.data.image_size)
  fraction = float(config.data.eval_crop_fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data.eval_crop_fraction must be in (0, 1], got {fraction}.")

  def fn(label, path, contents, mask):
    image = tf.cond(
        mask,
        lambda: augment.center_view(datasets.read_contents(path, contents), size, fraction),
        lambda: tf.zeros([size, size, 3], tf.uint8))
    return {"image": image, "label": tf.where(mask, label, -1), "mask": mask}

  return fn


# ----------------------------------------------------------------------------
# Public pipelines.
# ----------------------------------------------------------------------------

def pretrain_dataset(config, *, start_step: int, process_index: int, process_count: int):
  """The tf.data.Dataset behind `pretrain_batches` (for benchmarks and tuning)."""
  views = (config.augment.view1, config.augment.view2)
  return _train_dataset(config, views, ("view1", "view2"), _TAG_PRETRAIN,
                        batch_size=config.batch_size, start_step=start_step,
                        process_index=process_index, process_count=process_count)


def pretrain_batches(config, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[dict]:
  """This process's rows of global batches start_step, start_step + 1, ... forever.

  Yields dicts with `view1`, `view2` (uint8 [B/P, S, S, 3], cropped, resized
  and flipped on the host; colour ops are left to `augment.device_augment`)
  and `label` (int32, -1 when unlabelled). See the module docstring for the
  determinism and resume guarantees.
  """
  return pretrain_dataset(config, start_step=start_step, process_index=process_index,
                          process_count=process_count).as_numpy_iterator()


def linear_train_dataset(config, *, batch_size: int, start_step: int, process_index: int,
                         process_count: int, label_fraction: float = 1.0):
  """The tf.data.Dataset behind `linear_train_batches`."""
  return _train_dataset(config, (config.augment.view1,), ("image",), _TAG_LINEAR,
                        batch_size=batch_size, start_step=start_step,
                        process_index=process_index, process_count=process_count,
                        label_fraction=label_fraction)


def linear_train_batches(config, *, batch_size: int, start_step: int, process_index: int,
                         process_count: int, label_fraction: float = 1.0) -> Iterator[dict]:
  """Linear-evaluation / fine-tuning training batches, forever.

  Like `pretrain_batches` with one view `image` (random resized crop and flip,
  with view1's crop_area, crop_aspect and flip_prob) and `label`, over the
  labelled examples of `data.train_split`. `label_fraction` < 1 keeps a
  class-balanced subset fixed by config.seed (1% / 10% protocols).
  """
  return linear_train_dataset(config, batch_size=batch_size, start_step=start_step,
                              process_index=process_index, process_count=process_count,
                              label_fraction=label_fraction).as_numpy_iterator()


def eval_dataset(config, split: str, *, batch_size: int, process_index: int,
                 process_count: int):
  """The tf.data.Dataset behind `eval_batches`."""
  tf = augment.import_tensorflow()
  local = local_batch_size(batch_size, process_count)
  source = datasets.load_source(config, split)
  example_fn = _eval_fn(config)

  if isinstance(source, datasets.StreamingSource):
    splits = [source.process_split(p, process_count) for p in range(process_count)]
    sizes = [source.split_size(s) for s in splits]
    num_batches = max(math.ceil(n / local) for n in sizes)
    mine = sizes[process_index]
    ds = source.read(splits[process_index]).map(
        lambda image, label: (label, tf.constant(b""), image, tf.constant(True)))
    padding = tf.data.Dataset.from_tensors(
        (tf.constant(-1, tf.int32), tf.constant(b""), tf.constant(b""), tf.constant(False)))
    ds = ds.concatenate(padding.repeat(num_batches * local - mine))
  else:
    n = source.num_examples
    num_batches = math.ceil(n / batch_size)

    def rows(step):
      positions = batch_positions(int(step), batch_size, process_index, process_count)
      mask = positions < n
      ids = np.where(mask, positions, 0)
      paths, contents = source.fetch(ids)
      paths[~mask] = b""
      contents[~mask] = b""
      labels = np.where(mask, source.labels[ids], -1).astype(np.int32)
      return positions, labels, paths, contents, mask

    ds = _rows_dataset(rows, 0, num_batches, local, with_mask=True)
    ds = ds.map(lambda position, label, path, contents, mask: (label, path, contents, mask))

  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  drop = isinstance(source, datasets.RandomAccessSource) and not source.verified
  if drop:
    logging.warning("%s was not verified at start-up; an undecodable file would shorten "
                    "the evaluation by one example.", source.description)
  return _finish(ds, local, config.data.prefetch_batches, drop_errors=drop)


def eval_batches(config, split: str, *, batch_size: int, process_index: int,
                 process_count: int) -> Iterator[dict]:
  """One pass over `split` with evaluation preprocessing, in the split's order.

  Every process yields the same number of batches of exactly
  batch_size // process_count rows: `image` (uint8, centre crop of
  data.eval_crop_fraction of the short side resized to data.image_size),
  `label` (int32, -1 on padding) and `mask` (False on the padding rows that
  fill the last batch). Process p holds rows [p*b, (p+1)*b) of each global
  batch of the split taken in order.
  """
  return eval_dataset(config, split, batch_size=batch_size, process_index=process_index,
                      process_count=process_count).as_numpy_iterator()
