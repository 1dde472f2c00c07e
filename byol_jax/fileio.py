"""Files under --workdir, which may be local or remote (gs://, or any tf.io.gfile scheme).

Local paths use the os module, with fsync and an atomic rename, so a reader
sees the old file or the complete new one, never a truncated file. Paths with a
scheme go through `tf.io.gfile` (imported only then: local runs need no
TensorFlow): written to a temporary name, then renamed over the target.
"""

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator

from byol_jax.tf_import import import_tensorflow


def is_remote(path: str) -> bool:
  return "://" in path


def _gfile():
  return import_tensorflow().io.gfile  # costly; only for remote paths


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def read_text(path: str) -> str:
  if is_remote(path):
    with _gfile().GFile(path, "r") as f:
      return f.read()
  with open(path) as f:
    return f.read()


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
    if is_remote(path):
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


def open_for_writing(path: str) -> BinaryIO:
  """A binary file object that streams to `path` (for logs that grow, e.g. event files)."""
  if is_remote(path):
    return _gfile().GFile(path, "wb")
  return open(path, "wb")


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_local_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def append_text(path: str, text: str) -> None:
  """Appends to a local file; rewrites a remote one (object stores cannot append)."""
  if is_remote(path):
    write_text(path, (read_text(path) if exists(path) else "") + text)
  else:
    with open(path, "a") as f:
      f.write(text)
