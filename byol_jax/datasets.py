"""Data sources: where encoded images and labels come from.

Three kinds of `config.data.source`:

* `"tfds"`: a TensorFlow Datasets dataset `data.name` under `data.data_dir`,
  read offline only (nothing is ever downloaded; a missing dataset is a clear
  error that says how to prepare it). Datasets whose prepared size is at most
  `TFDS_IN_MEMORY_MAX_BYTES` (cifar10/100, stl10, imagenette, ...) are read
  once into memory as encoded bytes and become random-access; larger ones
  (imagenet2012) are streamed.
* `"folder"`: `data.path` is a directory tree of images or a .zip of one.
* `"demo"`: the CIFAR-10 sample embedded in `byol_jax/assets/` (see its
  README), read through the folder/zip code, so demos run offline anywhere.

Folder / zip layout
-------------------
Split strings (`data.train_split` etc.) look like TFDS ones: a name and an
optional slice, e.g. `"train"`, `"train[:5000]"`, `"train[10%:]"`.

* Splits. If the root has a top-level folder with the split's name, the split
  is that folder (e.g. the shared CIFAR-10 zip has `train/` and `test/`). If
  it has none of the usual split folders (train, test, val, validation,
  valid, unlabelled, unlabeled), the whole tree is every split, and slices are
  how to carve held-out data from it. If it has some split folders but not the
  one asked for, that is an error listing those it has. A zip whose entries
  all sit under one wrapper folder (`cifar10/train/...`) is unwrapped.
* Labels. Inside a split, each sub-folder is a class; class names, sorted,
  give labels 0..C-1, taken over all split folders together so that `train`
  and `test` agree even when one lacks a class. A split with no class
  sub-folders (e.g. STL-10's `unlabelled/`) has every label -1. When class
  folders exist, loose files directly in the split folder are ignored
  (logged).
* Order. Examples are in sorted path order. A slice takes its share of a fixed
  pseudo-random order (independent of `config.seed`), so `train[:10%]` mixes
  classes and `train[:10%]` / `train[10%:]` never overlap; the selected
  examples are then kept in path order.
* Files. Any extension in `IMAGE_EXTENSIONS`; hidden files and `__MACOSX`
  are ignored. TF decodes JPEG, PNG (8/16 bit, gray, palette, RGBA), GIF, BMP
  and WebP directly; anything TF cannot decode (TIFF, CMYK oddities, ...) is
  decoded once with PIL, converted to RGB and kept in memory as PNG.
  Undecodable files (corrupt, truncated, not an image) are skipped and their
  number logged. `data.verify_images` sets how that is checked: "all" decodes
  every file once at start-up with TF's own decoders (seconds for CIFAR-size
  data), "none" only checks extensions (decode errors at run time then drop
  the example from the stream with a warning), "auto" = "all" up to
  `VERIFY_AUTO_MAX_FILES` files.
"""

import dataclasses
import functools
import io
import mmap
import os
import re
import struct
import threading
import zipfile
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging

from byol_jax import augment

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".ico"})
# Formats TensorFlow's decoders read; other files go through PIL once.
TF_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp"})
SPLIT_FOLDER_NAMES = frozenset({
    "train", "test", "val", "validation", "valid", "unlabelled", "unlabeled"})
VERIFY_AUTO_MAX_FILES = 200_000
TFDS_IN_MEMORY_MAX_BYTES = 4 * 2**30
DEMO_ASSET = os.path.join(os.path.dirname(__file__), "assets", "cifar10_demo.zip")
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
    tfds = _import_tfds()
    return tfds.even_splits(self.split, n=process_count)[process_index]

  def split_size(self, split: str) -> int:
    return int(self.builder.info.splits[split].num_examples)

  def read(self, split: str):
    """tf.data of (encoded image, int32 label) for a (sub-)split, in file order."""
    tf = augment.import_tensorflow()
    tfds = _import_tfds()
    ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()},
                                 read_config=tfds.ReadConfig(try_autocache=False))
    has_label = "label" in self.builder.info.features

    def pick(ex):
      label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
      return ex["image"], label

    return ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------

def load_source(config, split: str):
  """The source for `split` under `config.data` (cached per process)."""
  data = config.data
  kind = data.source
  if kind == "demo":
    if not os.path.exists(DEMO_ASSET):
      raise DataSourceError(
          f"The embedded demo data {DEMO_ASSET} is missing; rebuild it with "
          "`python benchmarks/make_demo_assets.py` (needs ../shared/data) or reinstall byol_jax.")
    return _folder_source(DEMO_ASSET, split, _verify_policy(data))
  if kind == "folder":
    if not data.path:
      raise DataSourceError(
          "data.source='folder' needs data.path: a directory of images or a .zip of one, "
          "e.g. --config.data.path=/data/my_images.")
    return _folder_source(os.path.abspath(os.path.expanduser(data.path)), split,
                          _verify_policy(data))
  if kind == "tfds":
    return _tfds_source(data.name, data.data_dir, split)
  raise DataSourceError(
      f"Unknown data.source {kind!r}; use 'tfds', 'folder' (a directory or .zip) or 'demo'.")


def dataset_info(config, split: str) -> tuple:
  """(num_examples, num_classes) of a split; num_classes is 0 when unknown."""
  source = load_source(config, split)
  return source.num_examples, source.num_classes


def _verify_policy(data) -> str:
  policy = data.get("verify_images", "auto")
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


def _slice_bound(text, n: int, default: int) -> int:
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


# ----------------------------------------------------------------------------
# Folder and zip sources.
# ----------------------------------------------------------------------------

def _is_wanted(relpath: str) -> bool:
  parts = relpath.split("/")
  if any(p.startswith(".") or p == "__MACOSX" for p in parts):
    return False
  return os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


class _ZipReader:
  """Random access to the members of a zip without extracting it.

  Stored (uncompressed) members are sliced straight out of a memory map of the
  file, which costs about a microsecond; compressed ones go through zipfile.
  """

  def __init__(self, path: str):
    self.path = path
    self._zip = zipfile.ZipFile(path)
    self._file = open(path, "rb")
    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    self._lock = threading.Lock()
    self.infos = {i.filename: i for i in self._zip.infolist() if not i.is_dir()}

  def names(self):
    return list(self.infos)

  def _data_start(self, info) -> int:
    # The local header repeats the name and has its own extra field length.
    offset = info.header_offset
    if self._map[offset:offset + 4] != b"PK\x03\x04":
      raise zipfile.BadZipFile(f"bad local header for {info.filename} in {self.path}")
    name_len, extra_len = struct.unpack_from("<HH", self._map, offset + 26)
    return offset + 30 + name_len + extra_len

  def locator(self, name: str):
    """A cheap handle for `read`: (start, size) for stored members, else the name."""
    info = self.infos[name]
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
      return (self._data_start(info), info.file_size)
    return name

  def read(self, locator) -> bytes:
    if isinstance(locator, tuple):
      start, size = locator
      return self._map[start:start + size]
    with self._lock:
      return self._zip.read(locator)


def _list_directory(root: str):
  paths = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    rel = os.path.relpath(dirpath, root)
    for name in sorted(filenames):
      relpath = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
      if _is_wanted(relpath):
        paths.append(relpath)
  return paths


def _unwrap(relpaths, split_name: str):
  """Drops a single wrapper folder (`cifar10/train/...`) when below it are splits."""
  firsts = {p.split("/", 1)[0] for p in relpaths}
  if len(firsts) != 1 or not all("/" in p for p in relpaths):
    return relpaths, ""
  wrapper = firsts.pop()
  inner = [p.split("/", 1)[1] for p in relpaths]
  inner_tops = {p.split("/", 1)[0] for p in inner if "/" in p}
  if wrapper in SPLIT_FOLDER_NAMES or wrapper == split_name:
    return relpaths, ""
  if inner_tops & (SPLIT_FOLDER_NAMES | {split_name}):
    return inner, wrapper + "/"
  return relpaths, ""


def _select_split(relpaths, split: str, root: str):
  """(relpaths of the split relative to the root, prefix, class names, loose-file count)."""
  name, start, stop = parse_split(split)
  relpaths, wrapper = _unwrap(relpaths, name)
  tops = sorted({p.split("/", 1)[0] for p in relpaths if "/" in p})
  split_folders = [t for t in tops if t in SPLIT_FOLDER_NAMES or t == name]
  if name in tops:
    prefix = name + "/"
    members = [p[len(prefix):] for p in relpaths if p.startswith(prefix)]
  elif split_folders:
    raise DataSourceError(
        f"{root} has split folders {split_folders} but none named {name!r} (from split "
        f"{split!r}). Set the split to one of them, e.g. --config.data.test_split="
        f"{split_folders[-1]}.")
  else:
    logging.info("%s has no split folders; split %r uses the whole tree.", root, split)
    prefix, members = "", relpaths
    split_folders = []

  # Class names over every split folder, so that all splits share one mapping.
  if split_folders:
    classes = sorted({p.split("/", 2)[1] for p in relpaths
                      if p.split("/", 1)[0] in split_folders and p.count("/") >= 2})
  else:
    classes = sorted({p.split("/", 1)[0] for p in relpaths if "/" in p})
  has_classes = any("/" in p for p in members)
  loose = 0
  if has_classes:
    loose = sum("/" not in p for p in members)
    members = [p for p in members if "/" in p]
  members.sort()
  chosen = slice_indices(len(members), start, stop)
  members = [members[i] for i in chosen]
  return members, wrapper + prefix, classes if has_classes or split_folders else [], loose


@functools.lru_cache(maxsize=16)
def _folder_source(root: str, split: str, verify: str) -> RandomAccessSource:
  if not os.path.exists(root):
    raise DataSourceError(
        f"data.path {root} does not exist; point --config.data.path at a directory of "
        "images or a .zip of one.")
  is_zip = os.path.isfile(root)
  if is_zip:
    if not zipfile.is_zipfile(root):
      raise DataSourceError(f"data.path {root} is a file but not a zip archive; give a "
                            "directory of images or a .zip of one.")
    reader = _ZipReader(root)
    relpaths = sorted(n for n in reader.names() if _is_wanted(n))
  else:
    reader = None
    relpaths = _list_directory(root)
  if not relpaths:
    zips = sorted(f for f in os.listdir(root) if f.endswith(".zip")) if not is_zip else []
    hint = f" It holds zip files {zips[:3]}; did you mean one of them?" if zips else ""
    raise DataSourceError(
        f"No images found under {root} (looked for {', '.join(sorted(TF_EXTENSIONS))} and "
        f"other image extensions, in the folder and its sub-folders).{hint}")

  members, prefix, classes, loose = _select_split(relpaths, split, root)
  if not members:
    raise DataSourceError(
        f"Split {split!r} of {root} selects no images; check the split name and slice.")
  if loose:
    logging.warning("%s split %r: ignored %d files that sit beside the class folders.",
                    root, split, loose)
  class_index = {c: i for i, c in enumerate(classes)}
  labels = np.asarray([class_index[m.split("/", 1)[0]] if "/" in m else -1 for m in members],
                      np.int32)
  full = [prefix + m for m in members]
  if is_zip:
    handles = [reader.locator(name) for name in full]
    payload = {"zip": (reader, handles)}
  else:
    payload = {"dir": np.asarray([os.path.join(root, p).encode() for p in full], object)}

  verify_all = verify == "all" or (verify == "auto" and len(full) <= VERIFY_AUTO_MAX_FILES)
  fetch = _make_fetch(payload, overrides={})
  if verify_all:
    bad = _undecodable_by_tf(fetch, len(full))
  else:
    bad = [i for i, p in enumerate(full) if os.path.splitext(p)[1].lower() not in TF_EXTENSIONS]
  overrides, skipped = _convert_with_pil(fetch, bad)
  keep = np.asarray(sorted(set(range(len(full))) - set(skipped)), np.int64)
  if skipped:
    logging.warning("%s split %r: skipped %d undecodable file(s) of %d, e.g. %s.", root, split,
                    len(skipped), len(full), [full[i] for i in skipped[:5]])
  if overrides:
    logging.info("%s split %r: converted %d file(s) TF cannot decode with PIL.", root, split,
                 len(overrides))

  # Re-index everything onto the kept examples.
  remap = {int(old): new for new, old in enumerate(keep)}
  overrides = {remap[i]: v for i, v in overrides.items()}
  if is_zip:
    payload = {"zip": (reader, [handles[i] for i in keep])}
  else:
    payload = {"dir": payload["dir"][keep]}
  description = f"{root}:{split}"
  logging.info("%s: %d images, %d classes, %d skipped.", description, len(keep), len(classes),
               len(skipped))
  return RandomAccessSource(
      description=description, labels=labels[keep], num_classes=len(classes),
      fetch=_make_fetch(payload, overrides), verified=verify_all, num_skipped=len(skipped),
      class_names=tuple(classes))


def _make_fetch(payload, overrides):
  """indices -> (paths, contents) object arrays of bytes for the pipeline."""
  if "zip" in payload:
    reader, handles = payload["zip"]

    def fetch(indices):
      contents = np.empty(len(indices), object)
      for row, i in enumerate(indices):
        i = int(i)
        contents[row] = overrides[i] if i in overrides else reader.read(handles[i])
      return np.full(len(indices), b"", object), contents
    return fetch

  paths = payload["dir"]

  def fetch(indices):
    indices = np.asarray(indices, np.int64)
    contents = np.full(len(indices), b"", object)
    if overrides:
      for row, i in enumerate(indices):
        contents[row] = overrides.get(int(i), b"")
    return paths[indices], contents
  return fetch


def _undecodable_by_tf(fetch, n: int, chunk: int = 512):
  """Indices whose bytes TF's decoders reject (decoded once, in parallel)."""
  tf = augment.import_tensorflow()

  def rows(start):
    idx = np.arange(start, min(start + chunk, n), dtype=np.int64)
    paths, contents = fetch(idx)
    return idx, paths.astype(object), contents.astype(object)

  def load(start):
    idx, paths, contents = tf.numpy_function(rows, [start], [tf.int64, tf.string, tf.string],
                                             stateful=False)
    return tf.data.Dataset.from_tensor_slices((idx, paths, contents))

  def check(i, path, contents):
    contents = read_contents(path, contents)
    shape = tf.cond(augment.is_jpeg(contents),
                    lambda: tf.shape(tf.io.decode_jpeg(contents, channels=3)),
                    lambda: tf.shape(augment.decode_any(contents)))
    tf.debugging.assert_positive(shape[:2])
    return i

  ds = tf.data.Dataset.range(0, n, chunk).flat_map(load)
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().batch(4096)
  ok = np.zeros(n, bool)
  for batch in ds.as_numpy_iterator():
    ok[batch] = True
  return [int(i) for i in np.flatnonzero(~ok)]


def _convert_with_pil(fetch, indices: Sequence[int]):
  """PIL-decodes the given examples to RGB PNG bytes; returns (overrides, skipped)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  overrides, skipped = {}, []
  for i in indices:
    paths, contents = fetch(np.asarray([i]))
    try:
      data = contents[0] or _read_file(paths[0])
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
          image = image.convert("RGBA")  # palette transparency needs RGBA before RGB
        rgb = image.convert("RGB")
        if min(rgb.size) < 1:
          raise ValueError("empty image")
        buffer = io.BytesIO()
        rgb.save(buffer, "PNG", compress_level=1)
      overrides[i] = buffer.getvalue()
    except Exception:  # pylint: disable=broad-except  # any decoder failure means "skip"
      skipped.append(i)
  return overrides, skipped


def _read_file(path: bytes) -> bytes:
  with open(path.decode() if isinstance(path, bytes) else path, "rb") as f:
    return f.read()


def read_contents(path, contents):
  """In-graph: the encoded image, from `contents` if given else from the file."""
  tf = augment.import_tensorflow()
  return tf.cond(tf.strings.length(contents) > 0, lambda: contents,
                 lambda: tf.io.read_file(path))


# ----------------------------------------------------------------------------
# TFDS sources.
# ----------------------------------------------------------------------------

def _import_tfds():
  augment.import_tensorflow()  # hide accelerators before TFDS touches TF
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


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


@functools.lru_cache(maxsize=16)
def _tfds_source(name: str, data_dir: Optional[str], split: str):
  tfds = _import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types here
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
    return StreamingSource(description=description, builder=builder, split=split,
                           num_examples=num, num_classes=num_classes)
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
