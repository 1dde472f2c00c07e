r"""Command line: `python -m byol_jax.main --config=NAME --workdir=DIR [--job=JOB]`.

Every field of the config can be overridden: `--config.optimizer.base_lr=0.3`;
`--config=path/to/file.py` takes your own `get_config()`.
"""

import logging as std_logging
import os
import shlex
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

import byol_jax
from byol_jax import config_lib, errors, jobs

# 128 + SIGTERM, as a shell reports a job ended by it: schedulers treat it as "requeue".
# A first Ctrl-C saves and ends the same way.
PREEMPTED_EXIT_CODE = 143
# 128 + SIGINT: a second Ctrl-C, which leaves without saving.
INTERRUPTED_EXIT_CODE = 130
# What a user can cause; printed as one line unless --traceback. Anything else
# (a bare ValueError or ImportError included) is a bug: its traceback, then `bug_line`.
USER_ERRORS = (errors.ConfigError, errors.DataSourceError, errors.MissingDependencyError,
               errors.StorageError, errors.NonFiniteLossError, FileNotFoundError)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for all outputs "
                                "(--job=compile: optional, default the current directory).")
_JOB = flags.DEFINE_enum("job", "pretrain", list(jobs.JOBS), "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "Cloud TPU / SLURM (or set JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors.")
_ALLOW_CHANGED_RESUME = flags.DEFINE_bool(
    "allow_changed_resume", False, "Resume from a checkpoint written with other settings "
    "(batch size, steps, seed, data, augmentation), changing the run's trajectory on purpose.")


def usage() -> str:
  rows = lambda table: "\n".join(f"  {k:26s} {v}" for k, v in table.items())
  configs = {name: config_lib.describe(name) for name in config_lib.available()}
  return (f"{__doc__}\nConfigs (--config=NAME):\n{rows(configs)}\n\n"
          f"Jobs (--job=NAME):\n{rows(jobs.JOBS)}\n")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value and _JOB.value not in jobs.OFFLINE:
    raise errors.ConfigError("Missing --workdir: the directory for checkpoints, metrics "
                             "and exports (e.g. --workdir=runs/demo).")
  # Libraries (orbax above all) log every save at INFO; keep their warnings, drop the rest.
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  from byol_jax.preflight import topology  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel  # pylint: disable=g-import-not-at-top
  topology.quiet_libtpu()  # a host without TPUs that has libtpu (the [tpu] extra) runs quietly
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  result = jobs.run(_JOB.value, flags.FLAGS.config, _WORKDIR.value,
                    allow_changed_resume=_ALLOW_CHANGED_RESUME.value)
  if "preempted_at_step" in result:
    print(f"Preempted at step {result['preempted_at_step']}; the checkpoint is saved. Rerun the "
          "same command to resume.", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


class _OwnInfoOnly(std_logging.Filter):

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "byol_jax" in record.pathname


def main():
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
    print(usage() + "\nFlags:\n" + flags.FLAGS.main_module_help())
    sys.exit(0)
  try:
    config, argv = config_lib.load_from_argv(sys.argv)
  except errors.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_flags.DEFINE_config_dict("config", config, "The experiment config.", lock_config=True,
                                 sys_argv=argv)
  try:
    app.run(_main, argv=argv)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    print("error: interrupted without saving the steps since the last checkpoint; rerun the "
          "same command to resume from it.", file=sys.stderr)
    _exit(INTERRUPTED_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, USER_ERRORS) and not _TRACEBACK.value:
      print(f"error: {e}", file=sys.stderr)
    else:
      traceback.print_exc()
      if not isinstance(e, USER_ERRORS):
        print(bug_line(sys.argv), file=sys.stderr)
    _exit(1)


def bug_line(argv) -> str:
  """The line closing an unexpected error's traceback: it is a bug, with what to report."""
  command = " ".join(shlex.quote(a) for a in argv)
  return (f"error: this is a bug in byol_jax {byol_jax.__version__}, not a mistake of yours; "
          f"please report it with the traceback above and the command: {command}")


def _is_distributed() -> bool:
  jax = sys.modules.get("jax")
  return jax is not None and jax.distributed.is_initialized()


def _exit(code: int) -> None:
  """Exits; one process of a multi-process job leaves at once.

  A normal interpreter exit waits at JAX's shutdown barrier for the other
  processes, which are blocked in a collective of the step, until the shutdown
  timeout, and then JAX aborts every process (SIGABRT), hiding which one failed
  and why. Leaving at once keeps this exit status, and the others learn of it
  from the coordination service (at once, or within its heartbeat timeout).
  """
  if _is_distributed():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  main()
