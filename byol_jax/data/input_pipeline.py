"""Input pipelines that yield this process's numpy rows of each global batch:
tf.data for encoded images (here), host-side gathers for in-memory arrays
(`array_pipeline`), both over one stream (`stream_index`).

The stream
----------
Pretraining (and linear-eval training) reads an endless stream of examples:
stream position n (0, 1, 2, ...) holds example `order_e[n mod N]` of epoch
e = n // N, where order_e is a permutation of the N examples seeded by
(config.seed, e). Global batch k is positions [k*B, (k+1)*B); process p of P
takes rows [p*B/P, (p+1)*B/P) of it. Every random choice of the crop (window,
flip) of an example is seeded by (config.seed, its stream position, its view):
a stateless TF op on the host, or a threefry key for the device. Hence, for
random-access sources:

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

Host/device split (`batch`, the contract): for encoded sources (tf.data) the
host decodes, crops, resizes and flips and ships views (`batch.HOST_VIEWS`).
For in-memory arrays (`sources.ArraySource`) it only gathers rows, with a
`crop_seed` per example and view (a threefry key that is a fixed function of
(config.seed, stream position, view)), and the update step cuts both views on
the device (`batch.DEVICE_CROP`), so the same determinism, resume and
process-sharding guarantees hold; that path needs no TensorFlow. Either way
colour jitter, grayscale, blur and solarize run on the device inside the update
step (`device_augment`).
"""

import math
from typing import Iterator

import numpy as np
from absl import logging

from byol_jax.configs import base
from byol_jax.data import array_pipeline, datasets, sources
from byol_jax.data.stream_index import (ENDLESS, TAG_LINEAR, TAG_ORDER, TAG_PRETRAIN, TAG_SUBSET,
                                        StreamIndex, check_process, derive_seed, eval_crop_fraction,
                                        eval_rows, local_batch_size, train_examples)
from byol_jax.tf_import import import_tensorflow
from byol_jax.views import host_augment

# ----------------------------------------------------------------------------
# tf.data building blocks.
# ----------------------------------------------------------------------------

def _options():
  tf = import_tensorflow()
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
  tf = import_tensorflow()
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
  tf = import_tensorflow()
  if drop_errors:
    # Only for sources too large to verify at start-up: an undecodable file
    # is dropped (and logged by TF) instead of killing the run.
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(max(1, int(prefetch)) if prefetch else tf.data.AUTOTUNE)
  return ds.with_options(_options())


def _without_autograph(fn):
  """`fn` for tf.data to trace as written: the per-example maps branch with tf.cond, never
  with Python control flow on tensors, so AutoGraph's conversion is CPU time for nothing."""
  return import_tensorflow().autograph.experimental.do_not_convert(fn)


def _views_fn(config, view_configs, tag: int, keys):
  """Per-example map: encoded image -> host views named `keys`, seeded by position."""
  tf = import_tensorflow()
  size = int(config.data.image_size)
  style = base.resolve_augment(config.augment)
  view_seeds = [derive_seed(config.seed, tag, v) for v in range(len(view_configs))]
  view_configs = tuple(dict(crop_area=tuple(c["crop_area"]), crop_aspect=tuple(c["crop_aspect"]),
                            flip_prob=float(c["flip_prob"])) for c in view_configs)

  def fn(position, label, path, contents):
    contents = host_augment.read_contents(path, contents)
    seeds = tf.stack([tf.stack([tf.constant(s, tf.int64), position]) for s in view_seeds])
    views = host_augment.random_resized_views(contents, seeds, view_configs, size,
                                              style["crop"], style["resize"])
    out = {k: views[v] for v, k in enumerate(keys)}
    out["label"] = label
    return out

  return _without_autograph(fn)


def _train_dataset(config, source, view_configs, keys, tag: int, *, batch_size: int,
                   start_step: int, process_index: int, process_count: int,
                   label_fraction: float = 1.0):
  """The endless augmented stream for pretraining or linear training."""
  local = local_batch_size(batch_size, process_count)
  check_process(process_index, process_count, start_step)
  if isinstance(source, sources.ArraySource):
    raise ValueError(f"{source.description} is held as arrays and cropped on the device; it has "
                     "no tf.data pipeline (use pretrain_batches, or augment.crop_on=host).")
  example_fn = _views_fn(config, view_configs, tag, keys)
  if isinstance(source, sources.StreamingSource):
    return _streaming_train(config, source, example_fn, local, batch_size, start_step,
                            process_index, process_count, label_fraction)

  examples = train_examples(source.labels, tag, label_fraction, config.seed, source.description)
  index = StreamIndex(examples, config.seed, batch_size, process_index, process_count)

  def rows(step):
    positions, ids = index(int(step))
    paths, contents = source.fetch(ids)
    return positions, source.labels[ids], paths, contents

  ds = _rows_dataset(rows, start_step, ENDLESS, local, with_mask=False)
  tf = import_tensorflow()
  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, local, config.data.prefetch_batches, drop_errors=not source.verified)


def _streaming_train(config, source, example_fn, local, global_batch, start_step,
                     process_index, process_count, label_fraction):
  tf = import_tensorflow()
  split = source.process_split(process_index, process_count)
  base = source.read(split)
  shuffle_seed = derive_seed(config.seed, TAG_ORDER, process_index)
  first = start_step * local  # this process's local stream position to start at
  if label_fraction < 1.0:
    # No global view of the labels: keep each example with probability
    # label_fraction by a seeded hash of its first bytes (class-balanced in
    # expectation), and resume by skipping from the start of the stream.
    key = derive_seed(config.seed, TAG_SUBSET)
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

  ds = tf.data.Dataset.range(first_epoch, ENDLESS).flat_map(epoch).skip(skip)
  ds = ds.enumerate(start=first)

  def with_position(t, example):
    image, label = example
    position = (t // local) * global_batch + process_index * local + t % local
    return example_fn(position, label, tf.constant(b""), image)

  ds = ds.map(with_position, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, local, config.data.prefetch_batches, drop_errors=False)


def _eval_fn(config):
  tf = import_tensorflow()
  size = int(config.data.image_size)
  fraction = eval_crop_fraction(config)
  resize = base.resolve_augment(config.augment)["resize"]

  def fn(label, path, contents, mask):
    image = tf.cond(
        mask,
        lambda: host_augment.center_view(host_augment.read_contents(path, contents), size,
                                         fraction, resize),
        lambda: tf.zeros([size, size, 3], host_augment.VIEW_DTYPES[resize]))
    return {"image": image, "label": tf.where(mask, label, -1), "mask": mask}

  return _without_autograph(fn)


# ----------------------------------------------------------------------------
# Public pipelines.
# ----------------------------------------------------------------------------

def pretrain_dataset(config, *, start_step: int, process_index: int, process_count: int):
  """The tf.data.Dataset behind `pretrain_batches` (for benchmarks and tuning)."""
  views = (config.augment.view1, config.augment.view2)
  return _train_dataset(config, datasets.load_source(config, config.data.train_split), views,
                        ("view1", "view2"), TAG_PRETRAIN, batch_size=config.batch_size,
                        start_step=start_step, process_index=process_index,
                        process_count=process_count)


def pretrain_batches(config, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[dict]:
  """This process's rows of global batches start_step, start_step + 1, ... forever:
  `batch.PretrainBatch`s of the run's variant (`batch.pretrain_variant`). Colour
  ops are always left to `device_augment`. See the module docstring for the
  determinism and resume guarantees.
  """
  source = datasets.load_source(config, config.data.train_split)
  if _in_memory(source):
    return array_pipeline.pretrain_batches(config, source, start_step=start_step,
                                           process_index=process_index,
                                           process_count=process_count)
  return pretrain_dataset(config, start_step=start_step, process_index=process_index,
                          process_count=process_count).as_numpy_iterator()


def linear_train_dataset(config, *, batch_size: int, start_step: int, process_index: int,
                         process_count: int, label_fraction: float = 1.0):
  """The tf.data.Dataset behind `linear_train_batches`."""
  return _train_dataset(config, datasets.load_source(config, config.data.train_split),
                        (config.augment.view1,), ("image",), TAG_LINEAR, batch_size=batch_size,
                        start_step=start_step, process_index=process_index,
                        process_count=process_count, label_fraction=label_fraction)


def linear_train_batches(config, *, batch_size: int, start_step: int, process_index: int,
                         process_count: int, label_fraction: float = 1.0) -> Iterator[dict]:
  """Linear-evaluation / fine-tuning training batches, forever.

  Like `pretrain_batches` with one view `image` ([B/P, S, S, 3], random
  resized crop and flip, with view1's crop_area, crop_aspect and flip_prob;
  for in-memory arrays cut by `device_crop` before it is yielded) and `label`,
  over the labelled examples of `data.train_split`. `label_fraction` < 1 keeps
  a class-balanced subset fixed by config.seed (1% / 10% protocols).
  """
  kwargs = dict(batch_size=batch_size, start_step=start_step, process_index=process_index,
                process_count=process_count, label_fraction=label_fraction)
  source = datasets.load_source(config, config.data.train_split)
  if _in_memory(source):
    return array_pipeline.linear_train_batches(config, source, **kwargs)
  return linear_train_dataset(config, **kwargs).as_numpy_iterator()


def eval_dataset(config, split: str, *, batch_size: int, process_index: int,
                 process_count: int):
  """The tf.data.Dataset behind `eval_batches`."""
  tf = import_tensorflow()
  local = local_batch_size(batch_size, process_count)
  source = datasets.load_source(config, split)
  example_fn = _eval_fn(config)

  if isinstance(source, sources.StreamingSource):
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
    def rows(step):
      positions, ids, mask = eval_rows(int(step), source.num_examples, batch_size,
                                       process_index, process_count)
      paths, contents = source.fetch(ids)
      paths[~mask] = b""
      contents[~mask] = b""
      labels = np.where(mask, source.labels[ids], -1).astype(np.int32)
      return positions, labels, paths, contents, mask

    num_batches = math.ceil(source.num_examples / batch_size)
    ds = _rows_dataset(rows, 0, num_batches, local, with_mask=True)
    ds = ds.map(lambda position, label, path, contents, mask: (label, path, contents, mask))

  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  drop = isinstance(source, sources.RandomAccessSource) and not source.verified
  if drop:
    logging.warning("%s was not verified at start-up; an undecodable file would shorten "
                    "the evaluation by one example.", source.description)
  return _finish(ds, local, config.data.prefetch_batches, drop_errors=drop)


def eval_batches(config, split: str, *, batch_size: int, process_index: int,
                 process_count: int) -> Iterator[dict]:
  """One pass over `split` with evaluation preprocessing, in the split's order.

  Every process yields the same number of batches of exactly
  batch_size // process_count rows: `image` (`host_augment.VIEW_DTYPES`, centre crop of
  data.eval_crop_fraction of the short side resized to data.image_size),
  `label` (int32, -1 on padding) and `mask` (False on the padding rows that
  fill the last batch). Process p holds rows [p*b, (p+1)*b) of each global
  batch of the split taken in order.
  """
  kwargs = dict(batch_size=batch_size, process_index=process_index, process_count=process_count)
  source = datasets.load_source(config, split)
  if _in_memory(source):
    return array_pipeline.eval_batches(config, source, **kwargs)
  return eval_dataset(config, split, **kwargs).as_numpy_iterator()


def _in_memory(source) -> bool:
  """Whether `array_pipeline` reads `source`: `load_source` holds a split in memory exactly
  when `batch.pretrain_variant` is `DEVICE_CROP`, the run's one choice."""
  return isinstance(source, sources.ArraySource)
