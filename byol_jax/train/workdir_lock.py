"""One run per workdir: `workdir/run.lock` names the run that holds it (host, pid).

A second run on a workdir that a live run holds is refused at once, naming the
holder. A lock whose holder is gone (same host, process no longer running,
e.g. after kill -9) is taken over with a warning. A holder on another host
cannot be checked from here, so only a person removes its lock. Remote
workdirs (gs://) are not locked: object stores offer no atomic
create-if-absent through this code.

The lock appears atomically (a hard link fails if it exists), so two starters
cannot both create it; a stale one is removed only by the starter that first
creates `run.lock.takeover` the same way and finds the lock unchanged, so two
starters cannot both take it over.
"""

import contextlib
import datetime
import json
import os
import socket
from typing import Iterator, Optional

from absl import logging

from byol_jax import fileio
from byol_jax.errors import ConfigError

LOCK_NAME = "run.lock"


@contextlib.contextmanager
def hold(workdir: str, job: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds `workdir` for one job; refuses (ConfigError) when it is unusable or held.

  A workdir this call had to create is removed again if the job leaves it
  empty (a run that fails before writing anything leaves nothing behind).
  """
  if not enabled or fileio.is_remote(workdir):
    yield
    return
  created = _make_workdir(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  mine = _acquire(path, job)
  try:
    yield
  finally:
    if _read(path) == mine:
      os.remove(path)
    if created and not os.listdir(workdir):
      os.rmdir(workdir)


def _make_workdir(workdir: str) -> bool:
  """Creates `workdir` if missing; returns whether it did."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; pass a directory "
                      "(it is created if missing).")
  if os.path.isdir(workdir):
    return False
  try:
    os.makedirs(workdir)
  except OSError as e:
    raise ConfigError(f"Cannot create --workdir {workdir} ({e.strerror}); pass a directory you "
                      "can write to.") from e
  return True


def _acquire(path: str, job: str) -> dict:
  mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
          "job": job, "since": datetime.datetime.now().isoformat(timespec="seconds")}
  if _create(path, mine):
    return mine
  holder = _read(path)
  if holder is not None and _alive(holder):
    raise ConfigError(
        f"--workdir {os.path.dirname(path)} is in use by {_describe(holder)}; wait for it to end "
        "or pass another --workdir. If that run is gone, delete " + path + ".")
  _take_over(path, holder)
  if not _create(path, mine):  # another starter got in between: it holds the workdir now
    raise ConfigError(f"--workdir {os.path.dirname(path)} was just taken by "
                      f"{_describe(_read(path) or {})}; pass another --workdir.")
  return mine


def _take_over(path: str, stale: Optional[dict]) -> None:
  """Removes a dead holder's lock, unless it changed since it was judged stale."""
  guard = path + ".takeover"
  if not _create(guard, {"pid": os.getpid()}):
    raise ConfigError(f"Another run is taking over {path} right now; retry, or delete {guard} "
                      "if it is left over from a crash.")
  try:
    if _read(path) == stale:
      logging.warning("Taking over the lock %s of %s, which is no longer running.", path,
                      _describe(stale or {}))
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  finally:
    os.remove(guard)


def _create(path: str, content: dict) -> bool:
  """Creates `path` holding `content`, complete or not at all; False if it exists.

  Written beside it first and hard-linked into place, so a reader never sees a
  half-written lock.
  """
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(content, f)
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError as e:
    raise ConfigError(f"Cannot write to --workdir {os.path.dirname(path)} ({e.strerror}); pass a "
                      "directory you can write to.") from e
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def _read(path: str) -> Optional[dict]:
  """The holder a lock file names; None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _alive(holder: dict) -> bool:
  """Whether the holder may still run: always for another host (it cannot be checked)."""
  if holder.get("host") != socket.gethostname():
    return True
  pid = int(holder.get("pid", -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's live process
  # A recycled pid belongs to a process that started at another time.
  return holder.get("started") in (None, _start_time(pid))


def _start_time(pid: int) -> Optional[str]:
  """When `pid` started (Linux clock ticks since boot); None where /proc is missing."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (job {holder.get('job')}, since "
          f"{holder.get('since')})")
