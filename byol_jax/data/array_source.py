"""In-memory sources of equal-sized decoded uint8 images, for the device-side crop.

Two ways in, neither needing TensorFlow:

* `npz_source`: an .npz (`data.source="npz"`, `data.path=FILE.npz`) holding
  either `<split>_images` (uint8 [N, H, W, 3]) and optionally `<split>_labels`
  (int [N]) for each split name (`train_images`, `test_images`, ...), or one
  `images` / `labels` pair that every split shares (slices then carve held-out
  data from it). Optional: `num_classes` (scalar) and `class_names` (strings).
* `decoded`: a folder, zip, demo or small TFDS source decoded once with PIL.

Either way the images must all have one size (the device crop works on a
fixed-shape batch), and a split's labels are -1 where unknown.
"""

import concurrent.futures
import functools
import os

import numpy as np
from absl import logging

from byol_jax.data import folder_source
from byol_jax.data.sources import ArraySource, DataSourceError, RandomAccessSource
from byol_jax.data.sources import parse_split, slice_indices

# Decoded images above this size would not fit many hosts' memory; crop those on the host.
ARRAY_MAX_BYTES = 32 * 2**30


@functools.lru_cache(maxsize=4)
def _npz_arrays(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataSourceError(f"data.path {path} is not a file; data.source='npz' needs an .npz of "
                          "uint8 images (see byol_jax/data/array_source.py for its keys).")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise DataSourceError(f"Cannot read {path} as an .npz ({e}); give a file written by "
                          "np.savez or np.savez_compressed.") from e


@functools.lru_cache(maxsize=16)
def npz_source(path: str, split: str) -> ArraySource:
  """The split `split` (name and optional slice) of the .npz at `path`."""
  arrays = _npz_arrays(path)
  name, start, stop = parse_split(split)
  prefix = f"{name}_" if f"{name}_images" in arrays else ""
  if f"{prefix}images" not in arrays:
    names = sorted(k[:-len("_images")] for k in arrays if k.endswith("_images"))
    raise DataSourceError(
        f"{path} has no '{name}_images' array (split {split!r}) and no shared 'images'; its "
        f"splits are {names or 'none'}. Set the split to one of them.")
  images = _check_images(arrays[f"{prefix}images"], f"{path}:{prefix}images")
  labels = arrays.get(f"{prefix}labels")
  labels = (np.full(len(images), -1, np.int32) if labels is None
            else np.asarray(labels, np.int32).reshape(-1))
  if len(labels) != len(images):
    raise DataSourceError(f"{path}: {len(labels)} {prefix}labels for {len(images)} "
                          f"{prefix}images; they must pair up one to one.")
  if start is not None or stop is not None:  # a slice: a copy of its rows
    keep = slice_indices(len(images), start, stop)
    if not len(keep):
      raise DataSourceError(f"Split {split!r} of {path} selects no images; check its slice.")
    images, labels = images[keep], labels[keep]
  all_labels = [np.asarray(v).reshape(-1) for k, v in arrays.items() if k.endswith("labels")]
  num_classes = (int(arrays["num_classes"]) if "num_classes" in arrays
                 else max([int(v.max()) + 1 for v in all_labels if v.size] + [0]))
  class_names = tuple(str(c) for c in arrays.get("class_names", ()))
  return ArraySource(description=f"{path}:{split}", images=images, labels=labels,
                     num_classes=num_classes, class_names=class_names)


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise DataSourceError(
        f"{where} is {images.dtype} {list(images.shape)}; the in-memory path needs uint8 "
        "[N, H, W, 3] images (RGB, 0..255).")
  return images


_DECODED = {}  # id(source) -> (source, ArraySource); sources are cached, so ids stay unique


def decoded(source: RandomAccessSource) -> ArraySource:
  """`source`'s images decoded once with PIL into one uint8 array (cached).

  Undecodable images are skipped (and counted); images of different sizes are
  an error, since the device crop needs one shape.
  """
  key = id(source)
  if key not in _DECODED:
    _DECODED[key] = (source, _decode_all(source))
  return _DECODED[key][1]


def _decode_all(source: RandomAccessSource) -> ArraySource:
  n = source.num_examples
  paths, contents = source.fetch(np.arange(n, dtype=np.int64))

  def decode(i):
    try:
      return np.asarray(folder_source.pil_rgb(contents[i] or folder_source.read_file(paths[i])))
    except Exception:  # pylint: disable=broad-except  # any decoder failure means "skip"
      return None

  out, ok, shapes = None, np.zeros(n, bool), set()
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    for i, image in enumerate(pool.map(decode, range(n))):
      if image is None:
        continue
      if out is None:
        out = _allocate(source.description, n, image.shape)
      shapes.add(image.shape)
      if image.shape == out.shape[1:]:
        out[i], ok[i] = image, True
  if out is None:
    raise DataSourceError(f"{source.description}: no image could be decoded.")
  if len(shapes) > 1:
    shapes = sorted(shapes)
    raise DataSourceError(
        f"{source.description} holds images of {len(shapes)} sizes (e.g. {shapes[0][:2]} and "
        f"{shapes[-1][:2]}), but the device-side crop needs one size; set "
        "--config.augment.crop_on=host (tf.data, needs TensorFlow) or resize them to one size.")
  skipped = int(n - ok.sum())
  if skipped:
    logging.warning("%s: skipped %d undecodable image(s) of %d.", source.description, skipped, n)
    out = out[ok]
  logging.info("%s: decoded %d images of %s into memory (%.1f MB).", source.description,
               len(out), out.shape[1:], out.nbytes / 1e6)
  names = np.asarray(source.names or [f"#{i}" for i in range(n)], object)
  return ArraySource(description=source.description, images=out, labels=source.labels[ok],
                     num_classes=source.num_classes, class_names=source.class_names,
                     num_skipped=source.num_skipped + skipped,
                     names=tuple(names[ok]) if source.names else (),
                     skipped_names=source.skipped_names + tuple(names[~ok]))


def _allocate(description: str, n: int, shape) -> np.ndarray:
  nbytes = n * int(np.prod(shape))
  if nbytes > ARRAY_MAX_BYTES:
    raise DataSourceError(
        f"{description} would decode to {nbytes / 2**30:.1f} GiB, over the in-memory limit of "
        f"{ARRAY_MAX_BYTES / 2**30:.0f} GiB; set --config.augment.crop_on=host.")
  return np.empty((n, *shape), np.uint8)
