"""Folder and zip sources: a directory tree of images, or a .zip of one.

Layout
------
* Splits. If the root has a top-level folder with the split's name, the split
  is that folder (e.g. the shared CIFAR-10 zip has `train/` and `test/`). If
  it has none of the usual split folders (`SPLIT_FOLDER_NAMES`), the whole
  tree is every split, and slices are how to carve held-out data from it. If
  it has some split folders but not the one asked for, that is an error
  listing those it has. A zip whose entries all sit under one wrapper folder
  (`cifar10/train/...`) is unwrapped.
* Labels. Inside a split, each sub-folder is a class; class names, sorted,
  give labels 0..C-1, taken over all split folders together so that `train`
  and `test` agree even when one lacks a class. A split with no class
  sub-folders (e.g. STL-10's `unlabelled/`) has every label -1. When class
  folders exist, loose files directly in the split folder are ignored
  (logged).
* Order. Examples are in sorted path order; a slice keeps that order.
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

import functools
import io
import mmap
import os
import struct
import threading
import zipfile
from typing import Sequence

import numpy as np
from absl import logging

from byol_jax.data.sources import DataSourceError, RandomAccessSource, parse_split, slice_indices
from byol_jax.tf_import import import_tensorflow
from byol_jax.views import host_augment

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".ico"})
# Formats TensorFlow's decoders read; other files go through PIL once.
TF_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp"})
SPLIT_FOLDER_NAMES = frozenset({
    "train", "test", "val", "validation", "valid", "unlabelled", "unlabeled"})
VERIFY_AUTO_MAX_FILES = 200_000


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
def folder_source(root: str, split: str, verify: str) -> RandomAccessSource:
  """The split of a folder tree or zip at `root`; `verify` is "all", "none" or "auto"."""
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
    # os.fsencode: the name's own bytes, so a name that is not valid UTF-8 still opens.
    payload = {"dir": np.asarray([os.fsencode(os.path.join(root, p)) for p in full], object)}

  verify_all = verify == "all" or (verify == "auto" and len(full) <= VERIFY_AUTO_MAX_FILES)
  fetch = _make_fetch(payload, overrides={})
  if verify_all:
    bad = _undecodable_by_tf(fetch, len(full))
  else:
    bad = [i for i, p in enumerate(full) if os.path.splitext(p)[1].lower() not in TF_EXTENSIONS]
  overrides, skipped = _convert_with_pil(fetch, bad)
  keep = np.asarray(sorted(set(range(len(full))) - set(skipped)), np.int64)
  if len(skipped) == len(full):
    raise DataSourceError(
        f"None of the {len(full)} image files of split {split!r} under {root} can be decoded "
        f"(e.g. {[full[i] for i in skipped[:3]]}); check that they are images, not truncated "
        "downloads or HTML pages.")
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
      class_names=tuple(classes), names=tuple(full[i] for i in keep),
      skipped_names=tuple(full[i] for i in skipped))


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
  tf = import_tensorflow()

  def rows(start):
    idx = np.arange(start, min(start + chunk, n), dtype=np.int64)
    paths, contents = fetch(idx)
    return idx, paths.astype(object), contents.astype(object)

  def load(start):
    idx, paths, contents = tf.numpy_function(rows, [start], [tf.int64, tf.string, tf.string],
                                             stateful=False)
    return tf.data.Dataset.from_tensor_slices((idx, paths, contents))

  def check(i, path, contents):
    contents = host_augment.read_contents(path, contents)
    shape = tf.cond(host_augment.is_jpeg(contents),
                    lambda: tf.shape(tf.io.decode_jpeg(contents, channels=3)),
                    lambda: tf.shape(host_augment.decode_any(contents)))
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
  overrides, skipped = {}, []
  for i in indices:
    paths, contents = fetch(np.asarray([i]))
    try:
      rgb = pil_rgb(contents[0] or read_file(paths[0]))
      buffer = io.BytesIO()
      rgb.save(buffer, "PNG", compress_level=1)
      overrides[i] = buffer.getvalue()
    except Exception:  # pylint: disable=broad-except  # any decoder failure means "skip"
      skipped.append(i)
  return overrides, skipped


def pil_rgb(data: bytes):
  """Encoded image bytes -> a loaded RGB PIL image; raises on anything undecodable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
      image = image.convert("RGBA")  # palette transparency needs RGBA before RGB
    rgb = image.convert("RGB")
  if min(rgb.size) < 1:
    raise ValueError("empty image")
  return rgb


def read_file(path: bytes) -> bytes:
  with open(os.fsdecode(path), "rb") as f:
    return f.read()
