"""gs:// for orbax: an fsspec filesystem over `remote`, so checkpoints use the same client.

orbax reaches its files through etils.epath, which sends gs:// to TensorFlow's
gfile when TensorFlow is installed (no endpoint setting, so untestable) and to
fsspec's "gs" filesystem otherwise. `install` makes epath take fsspec and
registers this filesystem for "gs", so a checkpoint's directories, metadata and
commit markers go through `remote` like every other gs:// file; the arrays go
through tensorstore's own GCS driver, pointed at the same server.
"""

import io
import os

import fsspec
from fsspec.spec import AbstractFileSystem

from byol_jax import remote


class GCSFileSystem(AbstractFileSystem):
  """Objects as files; "directories" are the prefixes before a "/"."""

  protocol = ("gs", "gcs")
  root_marker = ""

  def __init__(self, *args, finalize_on_close: bool = True, **kwargs):
    del finalize_on_close  # every object is written whole, at close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for scheme in ("gs://", "gcs://"):
      path = path[len(scheme):] if path.startswith(scheme) else path
    return path.rstrip("/")

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    files, dirs = remote.list_dir(remote.SCHEME + path)
    out = [{"name": f[len(remote.SCHEME):], "size": n, "type": "file"} for f, n in files]
    out += [{"name": d[len(remote.SCHEME):], "size": 0, "type": "directory"} for d in dirs]
    if not out:
      out = [self.info(path)]  # a file lists as itself; a missing path raises
    return sorted(out, key=lambda o: o["name"]) if detail else sorted(o["name"] for o in out)

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    url = remote.SCHEME + path
    if "/" in path:
      found = remote.size(url)
      if found is not None:
        return {"name": path, "size": found, "type": "file"}
    if remote.exists(url):
      return {"name": path, "size": 0, "type": "directory"}
    raise FileNotFoundError(url)

  def exists(self, path, **kwargs):
    try:  # only absence is False: a permission or network error is raised as such
      self.info(path)
      return True
    except FileNotFoundError:
      return False

  def _open(self, path, mode="rb", **kwargs):
    url = remote.SCHEME + self._strip_protocol(path)
    if "r" in mode:
      return io.BytesIO(remote.read_bytes(url))
    start = remote.read_bytes(url) if "a" in mode and self.exists(url) else b""
    return _Upload(url, start)

  def cp_file(self, path1, path2, **kwargs):
    remote.copy(remote.SCHEME + self._strip_protocol(path1),
                remote.SCHEME + self._strip_protocol(path2))

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    """Copies each object, then deletes the originals (a "rename" on an object store)."""
    src, dst = (remote.SCHEME + self._strip_protocol(p) for p in (path1, path2))
    names = (remote.list_names(src + "/") if recursive else []) or [src]
    for name in names:
      remote.copy(name, dst + name[len(src):])
    for name in names:
      remote.delete(name)

  def rm_file(self, path):
    remote.delete(remote.SCHEME + self._strip_protocol(path))

  def rm(self, path, recursive=False, maxdepth=None):
    for p in [path] if isinstance(path, str) else path:
      url = remote.SCHEME + self._strip_protocol(p)
      for name in remote.list_names(url + "/") if recursive else []:
        remote.delete(name)
      remote.delete(url)

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # object stores have no directories

  def makedirs(self, path, exist_ok=False):
    pass

  def rmdir(self, path):
    pass


class _Upload(io.BytesIO):
  """A file written as one object when closed (complete or not at all)."""

  def __init__(self, url: str, start: bytes):
    super().__init__()
    self.url = url
    self.write(start)

  def close(self):
    if not self.closed:
      remote.write_bytes(self.url, self.getvalue())
    super().close()


def install() -> None:
  """Routes etils.epath's gs:// in this process through this filesystem (orbax's files, and
  TFDS's metadata on a gs:// data_dir once a checkpointer is made; tests/test_gcs_tfds.py),
  and tensorstore to the server STORAGE_EMULATOR_HOST names, if any."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  # epath reads EPATH_USE_TF once and caches the answer: set it only for that read, so that
  # child processes (which have no such filesystem registered) do not inherit it.
  before = os.environ.get("EPATH_USE_TF")
  os.environ["EPATH_USE_TF"] = "false"
  try:
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    gpath._is_tf_installed()  # pylint: disable=protected-access
  finally:
    if before is None:
      del os.environ["EPATH_USE_TF"]
    else:
      os.environ["EPATH_USE_TF"] = before
  for protocol in GCSFileSystem.protocol:
    fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator
