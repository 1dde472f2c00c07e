"""Files under --workdir, which may be local or remote (gs://, or any tf.io.gfile scheme).

Local paths use the os module, with fsync and an atomic rename, so a reader
sees the old file or the complete new one, never a truncated file. gs:// goes
through `remote` (one object per write, complete or absent). Other schemes go
through `tf.io.gfile` (imported only then: local runs need no TensorFlow):
written to a temporary name, then renamed over the target.

Object stores cannot append, so on gs:// `append_text` writes its text as one
new object beside the file (`FILE.parts/TIME.append`) and `read_text` joins
them: each append costs its own size, never a rewrite of the file. A later
`write_text` of such a file writes a `.full` part that supersedes the parts
before it (removed after it), so a kill between the two loses nothing.
"""

import concurrent.futures
import contextlib
import os
import tempfile
import time
from typing import BinaryIO, Iterator

from byol_jax import remote
from byol_jax.tf_import import import_tensorflow


def is_remote(path: str) -> bool:
  return "://" in path


def _gfile():
  return import_tensorflow().io.gfile  # costly; only for remote paths


def makedirs(path: str) -> None:
  if remote.is_gcs(path):
    return  # object stores have no directories
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  if remote.is_gcs(path):
    return remote.exists(path) or bool(remote.list_names(path + ".parts/", limit=1))
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def read_text(path: str) -> str:
  if remote.is_gcs(path):
    return _read_parts(path)
  if is_remote(path):
    with _gfile().GFile(path, "r") as f:
      return f.read()
  with open(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  if remote.is_gcs(path):
    return remote.read_bytes(path)
  if is_remote(path):
    with _gfile().GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def _parts(path: str) -> list:
  return remote.list_names(path + ".parts/")


def _read_parts(path: str) -> str:
  """A gs:// file: its newest `.full` part (else the object itself) and the appends after."""
  parts = _parts(path)
  full = [i for i, p in enumerate(parts) if p.endswith(".full")]
  if full:
    text, parts = "", parts[full[-1]:]
  else:
    text = remote.read_bytes(path).decode() if parts == [] or remote.exists(path) else ""
  return text + "".join(b.decode() for b in _each(remote.read_bytes, parts))


def _each(fn, paths: list) -> list:
  """fn over each path, many requests in flight (a long run leaves many parts)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(fn, paths))


def _part_name(path: str, kind: str) -> str:
  # Nanoseconds since the epoch, zero-padded: the names sort in the order written.
  return f"{path}.parts/{time.time_ns():020d}-{os.getpid()}.{kind}"


@contextlib.contextmanager
def atomic_local_path(path: str) -> Iterator[str]:
  """Yields a local temporary file name; its contents land at `path` only once complete.

  For writers that need a real file name (np.savez, safetensors, matplotlib).
  """
  if is_remote(path):
    fd, tmp = tempfile.mkstemp(prefix="byol_jax_", suffix=".tmp")
  else:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    if remote.is_gcs(path):
      remote.upload(tmp, path)
    elif is_remote(path):
      gfile = _gfile()
      gfile.makedirs(os.path.dirname(path))
      gfile.copy(tmp, path + ".tmp", overwrite=True)
      gfile.rename(path + ".tmp", path, overwrite=True)
    else:
      with open(tmp, "rb") as f:  # on disk before the rename, or a crash could leave it empty
        os.fsync(f.fileno())
      os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
      os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def streams(path: str) -> bool:
  """Whether `open_for_writing` can stream to `path` (not to an object store)."""
  return not remote.is_gcs(path)


def open_for_writing(path: str) -> BinaryIO:
  """A binary file object that streams to `path` (for logs that grow, e.g. event files).

  Not for gs://, where an object appears only once complete: write each
  stretch of the log as its own object (`write_bytes`).
  """
  if remote.is_gcs(path):
    raise ValueError(f"{path}: gs:// objects cannot be streamed to; write whole objects.")
  if is_remote(path):
    return _gfile().GFile(path, "wb")
  return open(path, "wb")


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  if remote.is_gcs(path):
    remote.write_bytes(path, data)
    return
  with atomic_local_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (on gs://, superseding its appended parts)."""
  if remote.is_gcs(path):
    old = _parts(path)
    if not old:
      remote.write_bytes(path, text.encode())
      return
    remote.write_bytes(_part_name(path, "full"), text.encode())
    _each(remote.delete, [path, *old])
    return
  with atomic_local_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def append_text(path: str, text: str) -> None:
  """Appends to a file; on gs:// writes `text` as one new part (object stores cannot append)."""
  if remote.is_gcs(path):
    remote.write_bytes(_part_name(path, "append"), text.encode())
  elif is_remote(path):
    write_text(path, (read_text(path) if exists(path) else "") + text)
  else:
    with open(path, "a") as f:
      f.write(text)
