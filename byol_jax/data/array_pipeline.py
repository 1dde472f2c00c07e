"""Batches of in-memory arrays (`sources.ArraySource`): the host only gathers rows.

The same stream as the tf.data pipelines (`input_pipeline`'s docstring states
the contract), with no TensorFlow: pretraining batches carry the raw `image`
and one `crop_seed` per example and view, and the update step cuts the views on
the device (`device_crop`). Linear-training and evaluation batches are cut by
the same `device_crop` functions, jitted on the default device, before they
are yielded, so their consumers see what the tf.data pipelines give.

A background thread keeps `data.prefetch_batches` batches gathered ahead.
"""

import itertools
import math
import queue
import threading
import weakref
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.configs import base
from byol_jax.data.stream_index import (TAG_LINEAR, TAG_PRETRAIN, StreamIndex, check_process,
                                        crop_seeds, eval_crop_fraction, eval_rows, local_batch_size,
                                        train_examples)
from byol_jax.views import device_crop, host_augment


def pretrain_batches(config, source, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[dict]:
  """This process's rows of global batches start_step, ...: `image` (uint8 [b, H, W, 3]),
  `crop_seed` (uint32 [b, 2, 2]: views 1 and 2) and `label`, forever."""
  index = _train_index(config, source, TAG_PRETRAIN, 1.0, config.batch_size, start_step,
                       process_index, process_count)

  def batch(step):
    positions, ids = index(step)
    return {"image": source.images[ids], "label": source.labels[ids],
            "crop_seed": crop_seeds(config.seed, TAG_PRETRAIN, 2, positions)}

  return _prefetched(map(batch, itertools.count(start_step)), config.data.prefetch_batches)


def linear_train_batches(config, source, *, batch_size: int, start_step: int, process_index: int,
                         process_count: int, label_fraction: float = 1.0) -> Iterator[dict]:
  """Linear-training batches: `image` ([b, S, S, 3], view1's crop and flip) and `label`."""
  index = _train_index(config, source, TAG_LINEAR, label_fraction, batch_size, start_step,
                       process_index, process_count)
  view, size = config.augment.view1, int(config.data.image_size)
  style = base.resolve_augment(config.augment)

  @jax.jit
  def cut(images, seeds):
    keys = jax.random.wrap_key_data(seeds, impl="threefry2x32")
    views = device_crop.random_views(images, keys, view, size, style["crop"], style["resize"])
    return _as_host_view(views, style["resize"])

  def batch(step):
    positions, ids = index(step)
    seeds = crop_seeds(config.seed, TAG_LINEAR, 1, positions)[:, 0]
    return {"image": np.asarray(cut(source.images[ids], seeds)), "label": source.labels[ids]}

  return _prefetched(map(batch, itertools.count(start_step)), config.data.prefetch_batches)


def eval_batches(config, source, *, batch_size: int, process_index: int,
                 process_count: int) -> Iterator[dict]:
  """One pass in order: `image` (centre crop, resized), `label`, `mask` (False on
  padding rows, whose image is 0 and label -1)."""
  local_batch_size(batch_size, process_count)
  check_process(process_index, process_count)
  size, fraction = int(config.data.image_size), eval_crop_fraction(config)
  resize = base.resolve_augment(config.augment)["resize"]
  center = jax.jit(lambda images: _as_host_view(
      device_crop.center_views(images, size, fraction, resize), resize))

  def batch(step):
    _, ids, mask = eval_rows(step, source.num_examples, batch_size, process_index,
                             process_count)
    images = np.where(mask[:, None, None, None], source.images[ids], 0).astype(np.uint8)
    return {"image": np.asarray(center(images)),
            "label": np.where(mask, source.labels[ids], -1).astype(np.int32), "mask": mask}

  steps = range(math.ceil(source.num_examples / batch_size))
  return _prefetched(map(batch, steps), config.data.prefetch_batches)


def _train_index(config, source, tag, label_fraction, batch_size, start_step, process_index,
                 process_count) -> StreamIndex:
  local_batch_size(batch_size, process_count)
  check_process(process_index, process_count, start_step)
  examples = train_examples(source.labels, tag, label_fraction, config.seed, source.description)
  return StreamIndex(examples, config.seed, batch_size, process_index, process_count)


def _as_host_view(views, resize: str):
  """Float [0, 1] views -> the dtype the tf.data pipeline ships for `resize`."""
  dtype = host_augment.VIEW_DTYPES[resize]
  if dtype == "uint8":
    return jnp.round(jnp.clip(views, 0.0, 1.0) * 255.0).astype(jnp.uint8)
  return views.astype(dtype)


class _Failure:

  def __init__(self, error):
    self.error = error


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
  """`items` produced by a background thread, up to `depth` ahead of the consumer.

  The thread starts now, so the first batches are gathered while the step
  compiles; it stops once the returned iterator is garbage-collected.
  """
  ready = queue.Queue(max(1, int(depth or 2)))
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
      put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
      put(_Failure(e))

  threading.Thread(target=produce, daemon=True, name="byol_jax-input").start()

  def consume():
    while True:
      item = ready.get()
      if item is _DONE:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item

  consumer = consume()
  weakref.finalize(consumer, stop.set)
  return consumer
