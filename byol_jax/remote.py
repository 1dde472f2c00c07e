"""gs:// objects, through google-cloud-storage: the one home of byol_jax's Cloud Storage I/O.

Why this client: TensorFlow's gfile has no endpoint setting, so nothing it does
on gs:// can be tested without Google's servers; gcsfs pins its own fsspec
release; google-cloud-storage is Google's kept client, talks to any server
STORAGE_EMULATOR_HOST names (the tests start fake-gcs-server on 127.0.0.1),
and offers generation preconditions: `create` writes an object only if none
exists (ifGenerationMatch=0), on which the workdir lock stands.

An object is written in one request, so a reader sees the old object or the
complete new one. Failures become one line saying what to check: a missing
bucket, missing or refused credentials, a lost connection.
"""

import contextlib
import functools
from typing import Iterator, List, Optional, Tuple

from byol_jax.errors import ConfigError, StorageError

SCHEME = "gs://"
# How long one request is retried on a transient failure before it is an error.
RETRY_DEADLINE_S = 120.0


def is_gcs(path: str) -> bool:
  return path.startswith(SCHEME)


def split(path: str) -> Tuple[str, str]:
  """gs://bucket/a/b -> ("bucket", "a/b")."""
  bucket, _, name = path[len(SCHEME):].partition("/")
  if not bucket:
    raise ConfigError(f"{path} names no bucket; write gs://BUCKET/PATH.")
  return bucket, name


@functools.lru_cache(maxsize=None)
def _client():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top  # only for gs://
  return storage.Client()


def _blob(path: str):
  bucket, name = split(path)
  return _client().bucket(bucket).blob(name)


def _retry():
  from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
  return retry.DEFAULT_RETRY.with_deadline(RETRY_DEADLINE_S)


@contextlib.contextmanager
def _errors(path: str, doing: str) -> Iterator[None]:
  """Turns the client's failures into one line naming what to check."""
  # pylint: disable=g-import-not-at-top
  import requests
  from google.api_core import exceptions
  from google.auth import exceptions as auth_exceptions
  bucket = split(path)[0]
  try:
    yield
  except auth_exceptions.DefaultCredentialsError as e:
    raise ConfigError(
        f"No Google Cloud credentials for {doing} {path}: run `gcloud auth application-default "
        "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key (a Cloud VM "
        f"uses its service account) ({_first_line(e)}).") from None
  except (exceptions.Unauthorized, auth_exceptions.RefreshError) as e:
    raise ConfigError(f"Cloud Storage refused the credentials for {doing} {path}: renew them "
                      f"(`gcloud auth application-default login`) ({_first_line(e)}).") from None
  except exceptions.Forbidden as e:
    raise ConfigError(f"Permission denied {doing} {path}: grant this account "
                      f"roles/storage.objectAdmin on gs://{bucket}, or pass a --workdir in a "
                      f"bucket it can write ({_first_line(e)}).") from None
  except exceptions.NotFound:
    if not bucket_exists(bucket):
      raise ConfigError(f"The bucket gs://{bucket} does not exist ({doing} {path}); create it "
                        f"(gcloud storage buckets create gs://{bucket}) or fix the path.") from None
    raise FileNotFoundError(f"No object {path}.") from None
  except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
          exceptions.RetryError, exceptions.ServerError) as e:
    cause = getattr(e, "cause", None) or e  # a RetryError's last failure
    raise StorageError(f"Lost the connection to Cloud Storage {doing} {path} "
                       f"({type(cause).__name__}: {_first_line(cause)}); check the network and rerun the same command: "
                       "what was written before is intact, and a run resumes from its last "
                       "checkpoint.") from None


def bucket_exists(bucket: str) -> bool:
  with _errors(f"{SCHEME}{bucket}/", "looking up"):
    return _client().lookup_bucket(bucket, retry=_retry()) is not None


def read_bytes(path: str) -> bytes:
  with _errors(path, "reading"):
    return _blob(path).download_as_bytes(retry=_retry())


def write_bytes(path: str, data: bytes) -> None:
  """Writes (replaces) an object in one request."""
  with _errors(path, "writing"):
    # A whole-object write is idempotent, so retrying it is safe.
    _blob(path).upload_from_string(data, retry=_retry())


def upload(local: str, path: str) -> None:
  with _errors(path, "writing"):
    _blob(path).upload_from_filename(local, retry=_retry())


def create(path: str, data: bytes) -> Optional[int]:
  """Writes the object only if none exists (ifGenerationMatch=0): its generation, or None
  if one exists."""
  return replace(path, data, 0)


def read_with_generation(path: str) -> Tuple[Optional[bytes], Optional[int]]:
  """(contents, generation) of an object; (None, None) if there is none."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  with _errors(path, "reading"):
    blob = _blob(path)
    try:
      data = blob.download_as_bytes(retry=_retry())
    except exceptions.NotFound:
      return None, None
  return data, blob.generation


def replace(path: str, data: bytes, generation: int) -> Optional[int]:
  """Replaces the object only if it is still at `generation` (0: absent): the new
  generation, or None if it changed."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  with _errors(path, "writing"):
    blob = _blob(path)
    try:
      # Conditioned on the generation, so retrying it is safe.
      blob.upload_from_string(data, if_generation_match=generation, retry=_retry())
    except exceptions.PreconditionFailed:
      return None
  return blob.generation


def delete(path: str, generation: Optional[int] = None) -> bool:
  """Deletes an object (only at `generation` if given); False if it was gone or changed."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  with _errors(path, "deleting"):
    try:
      _blob(path).delete(if_generation_match=generation, retry=_retry())
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False
  return True


def list_names(prefix: str, limit: Optional[int] = None) -> List[str]:
  """The full gs:// paths of the objects under `prefix`, sorted."""
  bucket, name = split(prefix)
  with _errors(prefix, "listing"):
    blobs = _client().list_blobs(bucket, prefix=name, max_results=limit, retry=_retry())
    return sorted(f"{SCHEME}{bucket}/{b.name}" for b in blobs)


def list_dir(path: str) -> Tuple[List[Tuple[str, int]], List[str]]:
  """One level under `path`: ([(object path, size)], [sub-"directory" paths])."""
  bucket, name = split(path)
  prefix = name.rstrip("/") + "/" if name.strip("/") else ""
  with _errors(path, "listing"):
    pages = _client().list_blobs(bucket, prefix=prefix, delimiter="/", retry=_retry())
    files = [(f"{SCHEME}{bucket}/{b.name}", b.size) for b in pages if b.name != prefix]
    dirs = [f"{SCHEME}{bucket}/{p.rstrip('/')}" for p in pages.prefixes]
  return files, sorted(dirs)


def copy(src: str, dst: str) -> None:
  (src_bucket, src_name), (dst_bucket, dst_name) = split(src), split(dst)
  with _errors(src, "copying"):
    client = _client()
    client.bucket(src_bucket).copy_blob(client.bucket(src_bucket).blob(src_name),
                                        client.bucket(dst_bucket), dst_name, retry=_retry())


def size(path: str) -> Optional[int]:
  """The size of an object; None if there is none."""
  bucket, name = split(path)
  with _errors(path, "reading"):
    blob = _client().bucket(bucket).get_blob(name, retry=_retry())
  return None if blob is None else blob.size


def exists(path: str) -> bool:
  """Whether `path` is an object, or a "directory" (a prefix of one)."""
  bucket, name = split(path)
  if not name.strip("/"):
    return bucket_exists(bucket)
  with _errors(path, "reading"):
    if _blob(path).exists(retry=_retry()):
      return True
  return bool(list_names(path.rstrip("/") + "/", limit=1))


def _first_line(e: Exception) -> str:
  text = (getattr(e, "message", None) or str(e)).strip().splitlines()
  return text[0][:200] if text else type(e).__name__
