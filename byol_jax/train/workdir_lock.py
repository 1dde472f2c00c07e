"""One run per workdir: `workdir/run.lock` names the run that holds it (host, pid).

A second run on a workdir that a live run holds is refused at once, naming the
holder. A lock whose holder is gone (same host, process no longer running,
e.g. after kill -9) is taken over with a warning. A holder on another host
cannot be checked from here, so only a person removes its lock.

On gs:// the lock is an object created only if none exists
(ifGenerationMatch=0) holding a lease: the holder renews it every RENEW_S
seconds; one whose lease ran out (its host died) or whose process is gone
from this host (kill -9) is taken over with a warning, by a write conditioned on the generation read, so
two starters cannot both take it. Other remote schemes are not locked.

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
import threading
import time
from typing import Iterator, Optional

from absl import logging

from byol_jax import fileio, remote
from byol_jax.errors import ConfigError, StorageError

LOCK_NAME = "run.lock"
# gs:// leases: a holder silent this long is taken for dead; it renews every RENEW_S.
LEASE_S = 300.0
RENEW_S = 60.0


@contextlib.contextmanager
def hold(workdir: str, job: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds `workdir` for one job; refuses (ConfigError) when it is unusable or held.

  A workdir this call had to create is removed again if the job leaves it
  empty (a run that fails before writing anything leaves nothing behind).
  """
  if enabled and remote.is_gcs(workdir):
    with _hold_object(os.path.join(workdir, LOCK_NAME), job):
      yield
    return
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


@contextlib.contextmanager
def _hold_object(path: str, job: str) -> Iterator[None]:
  """The gs:// lock: created if absent, its lease renewed while held, deleted at the end."""
  mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
          "job": job, "since": datetime.datetime.now().isoformat(timespec="seconds")}
  generation = _acquire_object(path, mine)
  stop = threading.Event()
  held = {"generation": generation}

  def renew():
    while not stop.wait(RENEW_S):
      try:
        generation = remote.replace(path, _lease(mine), held["generation"])
        if generation is None:
          logging.error("LOST THE LOCK %s: another run took it over (this run's lease had "
                        "run out); two runs may now write this workdir.", path)
          return
        held["generation"] = generation
      except (ConfigError, StorageError) as e:  # keep trying: the lease outlives a blip
        logging.warning("Could not renew the lock %s (%s); retrying.", path, e)

  thread = threading.Thread(target=renew, name="byol_jax lock lease", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    try:
      remote.delete(path, generation=held["generation"])
    except (ConfigError, StorageError) as e:  # the lease runs out on its own
      logging.warning("Could not remove the lock %s (%s); it lapses in %.0f s.", path, e,
                      LEASE_S)


def _lease(holder: dict) -> bytes:
  return json.dumps({**holder, "lease_until": time.time() + LEASE_S}).encode()


def _acquire_object(path: str, mine: dict) -> int:
  """Creates the lock object (or takes over a lapsed one); returns its generation."""
  workdir = os.path.dirname(path)
  taken = remote.create(path, _lease(mine))
  if taken is None:
    data, generation = remote.read_with_generation(path)
    holder = _parse(data)
    lapsed = time.time() - float(holder.get("lease_until", 0))
    if data is not None and lapsed < 0 and _alive(holder):
      raise ConfigError(
          f"--workdir {workdir} is in use by {_describe(holder)}; wait for it to end or pass "
          f"another --workdir. If that run is gone, its lease runs out in {-lapsed:.0f} s (then "
          f"a rerun takes the workdir over), or delete {path}.")
    if data is None:  # released between the two reads
      taken = remote.create(path, _lease(mine))
    else:
      why = (f"whose lease ran out {lapsed:.0f} s ago" if lapsed >= 0 else
             "which is no longer running")
      logging.warning("Taking over the lock %s of %s, %s.", path, _describe(holder), why)
      taken = remote.replace(path, _lease(mine), generation)
    if taken is None:
      raise ConfigError(f"--workdir {workdir} was just taken by another run; pass another "
                        "--workdir.")
  return taken


def _parse(data: Optional[bytes]) -> dict:
  try:
    return json.loads(data) if data else {}
  except ValueError:
    return {}
