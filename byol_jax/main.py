r"""Command line: `python -m byol_jax.main --config=NAME --workdir=DIR [--job=JOB]`.

Jobs: `pretrain` (default; resumes from DIR/checkpoints), `linear_eval` (frozen
encoder, or fine-tuning with --config.linear_eval.fine_tune=True), `knn`, and
`export` (encoder as .npz and as a torchvision state dict). Every field of the
config can be overridden: `--config.optimizer.base_lr=0.3`.
"""

import json
import logging as std_logging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from byol_jax import config_lib

JOBS = ("pretrain", "linear_eval", "knn", "export")
# 128 + SIGTERM, as a shell reports a job ended by it: schedulers treat it as "requeue".
PREEMPTED_EXIT_CODE = 143

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Named config (" + ", ".join(config_lib.available()) +
    ") or path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for all outputs.")
_JOB = flags.DEFINE_enum("job", "pretrain", JOBS, "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "Cloud TPU / SLURM (or set JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors.")


def run_job(job: str, config, workdir: str) -> dict:
  """Runs one job in-process (also the entry point tests use)."""
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax import evaluation, parallel, pretrain  # pylint: disable=g-import-not-at-top
  if job == "pretrain":
    return pretrain.run(config, workdir)
  mesh = parallel.make_mesh()
  source = config.linear_eval.pretrained_workdir or workdir
  if job == "linear_eval":
    from byol_jax import linear_eval  # pylint: disable=g-import-not-at-top
    return linear_eval.run(config, workdir, source, mesh)
  config, nets, state = pretrain.load_pretrained(config, source, mesh)
  if job == "knn":
    from byol_jax import input_pipeline, train_step  # pylint: disable=g-import-not-at-top
    kwargs = dict(batch_size=config.batch_size, process_index=jax.process_index(),
                  process_count=jax.process_count())
    metrics = evaluation.evaluate(
        train_step.make_embed_fn(nets, mesh), state.online_params, state.online_state,
        train_batches=input_pipeline.eval_batches(config, config.data.train_split, **kwargs),
        test_batches=input_pipeline.eval_batches(config, config.data.test_split, **kwargs),
        mesh=mesh, num_classes=config.data.num_classes, knn_k=config.eval.knn_k,
        knn_temperature=config.eval.knn_temperature)
    _write_result(workdir, "knn", metrics)
    return metrics
  from byol_jax import export  # pylint: disable=g-import-not-at-top
  params, net_state = parallel.fetch((state.online_params, state.online_state))
  paths = {}
  if jax.process_index() == 0:
    paths = export.run_export(params, net_state, config, os.path.join(workdir, "export"))
    print("[export] " + " ".join(f"{k}={v}" for k, v in paths.items()), flush=True)
  return paths


def _write_result(workdir, name, metrics):
  import jax  # pylint: disable=g-import-not-at-top
  print(f"[{name}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
  if jax.process_index() == 0:
    from byol_jax import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_text(os.path.join(workdir, f"{name}_results.json"), json.dumps(metrics, indent=2))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise config_lib.ConfigError("Missing --workdir: the directory for checkpoints, metrics "
                                 "and exports (e.g. --workdir=runs/demo).")
  # Libraries (orbax above all) log every save at INFO; keep their warnings, drop the rest.
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  from byol_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("Config:\n%s", _CONFIG.value)
  result = run_job(_JOB.value, _CONFIG.value, _WORKDIR.value)
  if isinstance(result, dict) and "preempted_at_step" in result:
    print(f"Preempted at step {result['preempted_at_step']}; the checkpoint is saved. Rerun the "
          "same command to resume.", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


class _OwnInfoOnly(std_logging.Filter):

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "byol_jax" in record.pathname


def main():
  try:
    argv = config_lib.resolve_argv(sys.argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    app.run(_main, argv=argv)
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e) or _TRACEBACK.value:
      if not _is_distributed():
        raise
      traceback.print_exc()
    else:
      print(f"error: {e}", file=sys.stderr)
    _exit(1)


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


def _is_user_error(e: Exception) -> bool:
  from byol_jax import pretrain  # pylint: disable=g-import-not-at-top
  return isinstance(e, (config_lib.ConfigError, FileNotFoundError, ValueError,
                        pretrain.NonFiniteLossError))


if __name__ == "__main__":
  main()
