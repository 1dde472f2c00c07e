r"""Runs one multi-process job on this machine, as a cluster would, over loopback.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \
        --config=demo --workdir=runs/demo_2x4 --config.steps=20

starts `python -m byol_jax.main` N times with `--coordinator_address` (a free
loopback port), `--num_processes` and `--process_id`, each process seeing K
simulated CPU devices. Everything after `--` (or any argument this launcher does
not know) goes to byol_jax.main unchanged. Output lines are prefixed `[pI]`.

When a process fails, the others are given `--failure_grace` seconds to notice
(a collective with the dead process fails, or JAX's coordination service misses
its heartbeats) and exit by themselves, which they do within about the heartbeat
timeout; whoever is left is then stopped. The launcher exits non-zero and names
the process that failed first. `--dry-run` prints the commands and the
environment instead of running them.
"""

import argparse
import dataclasses
import os
import pathlib
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
# JAX swallows SIGTERM once distributed (it is the preemption notice), so a
# process that ignores it for this long is killed.
KILL_AFTER_TERM_S = 5.0
POLL_S = 0.2


@dataclasses.dataclass
class Proc:
  index: int
  popen: subprocess.Popen
  reader: threading.Thread
  stopped_by_launcher: bool = False


def parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      allow_abbrev=False, prog="launch/local.py", description=__doc__.split("\n\n")[0],
      epilog="Arguments after `--`, and unknown ones, are passed to byol_jax.main.")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="Simulated CPU devices per process (XLA host device count).")
  parser.add_argument("--port", type=int, default=0,
                      help="Coordinator port on 127.0.0.1; 0 picks a free one.")
  parser.add_argument("--heartbeat_timeout", type=int, default=20,
                      help="Seconds of silence after which JAX declares a process dead.")
  parser.add_argument("--shutdown_timeout", type=int, default=60,
                      help="Seconds a finished process waits at exit for the others.")
  parser.add_argument("--failure_grace", type=float, default=None,
                      help="After a process fails, seconds the others get to exit by "
                      "themselves before they are stopped (default: heartbeat timeout + 15).")
  parser.add_argument("--python", default=sys.executable, help="Interpreter for the processes.")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the commands and environment; run nothing.")
  args, rest = parser.parse_known_args(argv)
  args.main_args = [a for a in rest if a != "--"]
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be at least 1.")
  if not any(a.startswith("--config") for a in args.main_args):
    parser.error("Pass byol_jax.main's arguments, e.g. -- --config=demo --workdir=runs/x")
  if args.failure_grace is None:
    args.failure_grace = args.heartbeat_timeout + 15.0
  return args


def free_port() -> int:
  """A port nothing listens on now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
  """XLA_FLAGS with the host device count replaced (an inherited one would compete)."""
  flag = "--xla_force_host_platform_device_count"
  kept = [f for f in xla_flags.split() if not f.startswith(flag)]
  return " ".join(kept + [f"{flag}={count}"])


def child_env_overrides(args, port: int) -> Dict[str, str]:
  """The environment variables every process gets on top of the launcher's own."""
  pythonpath = os.environ.get("PYTHONPATH", "")
  return {
      "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), args.devices_per_process),
      # Simulated CPU devices: a GPU on this machine must not be picked instead.
      "JAX_PLATFORMS": "cpu",
      # Keep the coordinator off the network interfaces; only loopback is used.
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
      "BYOL_HEARTBEAT_TIMEOUT_S": str(args.heartbeat_timeout),
      "BYOL_SHUTDOWN_TIMEOUT_S": str(args.shutdown_timeout),
      # The processes import byol_jax from this checkout, whatever the cwd.
      "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), pythonpath) if p),
      "PYTHONUNBUFFERED": "1",
  }


def commands(args, port: int) -> List[List[str]]:
  return [[args.python, "-m", "byol_jax.main", *args.main_args,
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={args.num_processes}",
           f"--process_id={i}"] for i in range(args.num_processes)]


def print_dry_run(args, port: int) -> None:
  env = child_env_overrides(args, port)
  print("# environment of every process:")
  for key, value in env.items():
    print(f"export {key}={shlex.quote(value)}")
  for i, cmd in enumerate(commands(args, port)):
    print(f"# process {i}:")
    print(shlex.join(cmd))


def _die_with_parent() -> None:
  """Linux: the child is killed if the launcher dies, so no training is orphaned."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _pump(index: int, stream, lock: threading.Lock) -> None:
  """Copies one process's output to ours, line by line, prefixed with its index."""
  prefix = f"[p{index}] "
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
      sys.stdout.flush()
  stream.close()


def _report_exit(proc: Proc, exits: queue.Queue) -> None:
  """Puts (time, proc) on `exits` the moment the process ends, so exits queue in
  the order they happened even when they are milliseconds apart."""
  proc.popen.wait()
  exits.put((time.monotonic(), proc))


def start(args, port: int, lock: threading.Lock, exits: queue.Queue) -> List[Proc]:
  env = {**os.environ, **child_env_overrides(args, port)}
  procs = []
  for i, cmd in enumerate(commands(args, port)):
    popen = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", bufsize=1,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    reader = threading.Thread(target=_pump, args=(i, popen.stdout, lock), daemon=True)
    reader.start()
    proc = Proc(i, popen, reader)
    threading.Thread(target=_report_exit, args=(proc, exits), daemon=True).start()
    procs.append(proc)
    say(lock, f"started process {i} of {args.num_processes} (pid {popen.pid})")
  return procs


def say(lock: threading.Lock, message: str) -> None:
  with lock:
    print(f"[launch] {message}", flush=True)


def describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


def stop(procs: List[Proc], lock: threading.Lock) -> None:
  """SIGTERM, then SIGKILL for whoever is still there after KILL_AFTER_TERM_S."""
  alive = [p for p in procs if p.popen.poll() is None]
  for p in alive:
    p.stopped_by_launcher = True
    say(lock, f"stopping process {p.index} (pid {p.popen.pid})")
    p.popen.terminate()
  deadline = time.monotonic() + KILL_AFTER_TERM_S
  for p in alive:
    try:
      p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.popen.kill()
      p.popen.wait()


def supervise(procs: List[Proc], exits: queue.Queue, grace_s: float,
              lock: threading.Lock) -> int:
  """Waits for every process; after the first failure, the rest get `grace_s` to exit.

  Returns the launcher's exit status: 0, or the first failure's status
  (128 + signal number when it was killed by a signal).
  """
  first_failure: Optional[Proc] = None
  failed_at = deadline = None
  running = len(procs)
  try:
    while running:
      try:
        # Short waits keep Ctrl-C responsive.
        ended_at, proc = exits.get(timeout=POLL_S)
      except queue.Empty:
        if deadline is not None and time.monotonic() > deadline:
          stop(procs, lock)
          break
        continue
      running -= 1
      code = proc.popen.returncode
      if first_failure is None:
        if code != 0:
          first_failure, failed_at, deadline = proc, ended_at, ended_at + grace_s
          say(lock, f"process {proc.index} {describe(code)}; the other processes get "
              f"{grace_s:.0f} s to notice and exit")
      else:
        say(lock, f"process {proc.index} {describe(code)} by itself, "
            f"{ended_at - failed_at:.1f} s after process {first_failure.index} failed")
  except KeyboardInterrupt:
    say(lock, "interrupted; stopping every process")
    stop(procs, lock)
    return 130
  for p in procs:
    p.reader.join(timeout=5)
  if first_failure is None:
    say(lock, f"all {len(procs)} processes finished")
    return 0
  stopped = [p.index for p in procs if p.stopped_by_launcher]
  note = f"; stopped process(es) {stopped} that were still running" if stopped else ""
  code = first_failure.popen.returncode
  with lock:
    print(f"error: process {first_failure.index} of {len(procs)} {describe(code)}{note}.",
          file=sys.stderr, flush=True)
  return code if code > 0 else 128 + (-code)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  if args.dry_run:
    print_dry_run(args, port)
    return 0
  lock = threading.Lock()
  say(lock, f"coordinator 127.0.0.1:{port}, {args.num_processes} process(es) x "
      f"{args.devices_per_process} CPU device(s)")
  # SIGTERM to the launcher (a scheduler, `timeout`) stops the job like Ctrl-C.
  signal.signal(signal.SIGTERM, _interrupt)
  exits = queue.Queue()
  procs = start(args, port, lock, exits)
  return supervise(procs, exits, args.failure_grace, lock)


if __name__ == "__main__":
  sys.exit(main())
