"""TFDS sources, read offline only: nothing is ever downloaded.

A missing dataset is a clear error that says how to prepare it. Datasets whose
prepared size is at most `TFDS_IN_MEMORY_MAX_BYTES` (cifar10/100, stl10,
imagenette, ...) are read once into memory as encoded bytes and become
random-access; larger ones (imagenet2012) are streamed.
"""

import dataclasses
import functools
import re
from typing import Optional

import numpy as np
from absl import logging

from byol_jax.data.sources import DataSourceError, RandomAccessSource, StreamingSource
from byol_jax.tf_import import import_tensorflow

TFDS_IN_MEMORY_MAX_BYTES = 4 * 2**30


def import_tfds():
  import_tensorflow()  # hide accelerators before TFDS touches TF
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def read_split(builder, split: str):
  """tf.data of (encoded image, int32 label) for a (sub-)split, in file order."""
  tf = import_tensorflow()
  tfds = import_tfds()
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  has_label = "label" in builder.info.features

  def pick(ex):
    label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
    return ex["image"], label

  return ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE)


@dataclasses.dataclass
class TfdsStream(StreamingSource):
  """A TFDS split too large to hold in memory; read in file order, sharded by process."""
  builder: object
  split: str

  def process_split(self, process_index: int, process_count: int) -> str:
    return import_tfds().even_splits(self.split, n=process_count)[process_index]

  def split_size(self, split: str) -> int:
    return int(self.builder.info.splits[split].num_examples)

  def read(self, split: str):
    return read_split(self.builder, split)


def _not_prepared_message(name: str, data_dir: Optional[str], cause) -> str:
  where = data_dir or "~/tensorflow_datasets (the TFDS default)"
  base_name = name.split("/")[0]
  if base_name == "imagenet2012":
    how = (
        "ImageNet needs a manual download: get ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar from https://image-net.org (registration required), put them "
        f"in {where}/downloads/manual/, then run `tfds build imagenet2012 --data_dir={where}` "
        "(about 300 GB of disk). Alternatively use --config.data.source=folder with "
        "--config.data.path pointing at an ImageNet folder tree (train/<wnid>/*.JPEG).")
  else:
    how = (
        f"Prepare it on a machine with network access with `tfds build {name} "
        f"--data_dir=DIR` and copy DIR here (set --config.data.data_dir=DIR), or use "
        "--config.data.source=folder with a directory or .zip of images.")
  return (f"TFDS dataset {name!r} is not available offline under {where} ({cause}). "
          f"Nothing is downloaded at run time. {how}")


def _raise_if_refused(error: BaseException, data_dir: Optional[str]) -> None:
  """One line for a data_dir that TensorFlow may not read (on gs://: no or refused credentials,
  no permission), rather than TFDS's "failed to construct" the dataset."""
  tf = import_tensorflow()
  chain, cause = [], error
  while cause is not None and cause not in chain:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  refused = [c for c in chain if isinstance(
      c, (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError))]
  if not refused:
    return
  text = str(refused[0])
  detail = (text.strip().splitlines() or [""])[0].split(" with body")[0]
  message = re.search(r'"message":\s*"([^"\n]*)"', text)  # Cloud Storage's JSON error
  if message:
    detail += f": {message.group(1).rstrip('.')}"
  check = ("TensorFlow reads gs:// with this machine's Google Cloud credentials: run `gcloud auth "
           "application-default login` (a Cloud VM uses its service account), and grant them "
           "roles/storage.objectViewer on the bucket" if str(data_dir).startswith("gs://")
           else "check its permissions")
  raise DataSourceError(f"Cannot read the TFDS data_dir {data_dir}: access denied "
                        f"({type(refused[0]).__name__}: {detail}). {check}.") from error


@functools.lru_cache(maxsize=16)
def tfds_source(name: str, data_dir: Optional[str], split: str):
  """The split of TFDS dataset `name` under `data_dir`: in memory when small, else streamed."""
  tfds = import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types here
    _raise_if_refused(e, data_dir)
    raise DataSourceError(
        f"TFDS does not know the dataset {name!r} ({type(e).__name__}: {e}). Check "
        "data.name (e.g. 'cifar10', 'imagenet2012', 'stl10', 'imagenette/full-size-v2').") from e
  decoders = {"image": tfds.decode.SkipDecoding()}
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(try_autocache=False))
  except AssertionError as e:  # TFDS's "could not find data" is an assertion
    raise DataSourceError(_not_prepared_message(name, data_dir, e)) from e
  except (ValueError, KeyError) as e:
    known = list(builder.info.splits) if builder.info.splits else []
    raise DataSourceError(
        f"Cannot read split {split!r} of TFDS dataset {name!r}: {e}. Its splits are "
        f"{known or 'unknown (dataset not prepared)'}.") from e

  features = builder.info.features
  if "image" not in features:
    raise DataSourceError(f"TFDS dataset {name!r} has no 'image' feature; it is not an "
                          "image classification dataset this pipeline can read.")
  num_classes = int(features["label"].num_classes) if "label" in features else 0
  size = int(builder.info.dataset_size or 0)
  description = f"tfds:{name}:{split}"
  if size > TFDS_IN_MEMORY_MAX_BYTES:
    num = int(builder.info.splits[split].num_examples)
    logging.info("%s: streaming %d examples (%.1f GB prepared).", description, num, size / 1e9)
    return TfdsStream(description=description, num_examples=num, num_classes=num_classes,
                      builder=builder, split=split)
  return _read_tfds_into_memory(ds, description, num_classes, "label" in features)


def _read_tfds_into_memory(ds, description: str, num_classes: int, has_label: bool):
  """One pass over a small TFDS split, keeping the encoded bytes and labels."""
  images, labels = [], []
  for batch in ds.batch(1024).as_numpy_iterator():
    images.extend(batch["image"].tolist())
    if has_label:
      labels.append(np.asarray(batch["label"], np.int32))
    else:
      labels.append(np.full(len(batch["image"]), -1, np.int32))
  if not images:
    raise DataSourceError(f"{description} is empty; check the split and its slice.")
  contents = np.empty(len(images), object)  # bytes objects, not a fixed-width bytes dtype
  contents[:] = images
  empty_paths = np.full(len(images), b"", object)

  def fetch(indices):
    indices = np.asarray(indices, np.int64)
    return empty_paths[indices], contents[indices]

  logging.info("%s: %d examples read into memory (%.1f MB encoded).", description, len(images),
               sum(len(x) for x in images) / 1e6)
  return RandomAccessSource(description=description, labels=np.concatenate(labels),
                            num_classes=num_classes, fetch=fetch, verified=True)
