"""The pretraining job: data -> update step -> metrics and checkpoints.

Every process runs this same loop over its own shard of each global batch. The
loop itself is short on purpose: the step is `train_step.update`, the data is
`input_pipeline.pretrain_batches` (a pure function of the step, which is why
resuming only needs the TrainState), and checkpoints are `checkpoint.Checkpointer`.
"""

import contextlib
import functools
import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from byol_jax import checkpoint, config_lib, evaluation, fileio, networks, parallel, reporting
from byol_jax import train_step


class NonFiniteLossError(RuntimeError):
  pass


@contextlib.contextmanager
def preemption_watch():
  """Yields `preempted(step) -> bool`: True once SIGTERM asked this job to stop.

  SIGTERM is what SLURM, Kubernetes and spot/preemptible VMs send before they
  kill a job. In a multi-process job JAX's runtime catches it and agrees with
  every process on the step to stop at; a lone process watches for it here.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: False
    return
  flag = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
  try:
    yield lambda step: flag.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)


def prepare(config, mesh):
  """Dataset sizes -> finalised config (derived steps, classes) checked against the mesh."""
  from byol_jax import datasets  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  num_examples, num_classes = datasets.dataset_info(config, config.data.train_split)
  config = config_lib.finalize(config, num_examples, num_classes)
  parallel.check_batch_size(config.batch_size, mesh)
  return config


def create_state(config, nets, optimizer, mesh):
  size = config.data.image_size
  init = functools.partial(train_step.init_state, config, nets, optimizer, (size, size, 3),
                           config.seed)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def run(config, workdir: str, mesh=None) -> dict:
  """Pretrains (or resumes) in `workdir`; returns the last metrics."""
  from byol_jax import augment, input_pipeline  # pylint: disable=g-import-not-at-top
  mesh = mesh or parallel.make_mesh()
  config = prepare(config, mesh)
  chief = jax.process_index() == 0
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = train_step.make_optimizer(config)
  state = create_state(config, nets, optimizer, mesh)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
  arch = checkpoint.architecture(config)
  start, restored = ckpt.restore(checkpoint.abstract(state), arch)
  if restored is not None:
    state = restored
    logging.info("Resumed from the checkpoint at step %d.", start)
  start = start or 0
  if chief:
    fileio.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  update = train_step.make_update_fn(config, nets, optimizer, mesh, augment.make_augment_fn(config))
  embed = train_step.make_embed_fn(nets, mesh)
  reporter = reporting.Reporter(workdir, total_steps=config.steps, batch_size=config.batch_size,
                                enabled=chief)
  batches = input_pipeline.pretrain_batches(
      config, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())
  meta = {"architecture": arch, "config": config.to_dict()}

  def run_eval(state):
    size = config.batch_size
    kwargs = dict(batch_size=size, process_index=jax.process_index(),
                  process_count=jax.process_count())
    return evaluation.evaluate(
        embed, state.online_params, state.online_state,
        train_batches=input_pipeline.eval_batches(config, config.data.train_split, **kwargs),
        test_batches=input_pipeline.eval_batches(config, config.data.test_split, **kwargs),
        mesh=mesh, num_classes=config.data.num_classes, knn_k=config.eval.knn_k,
        knn_temperature=config.eval.knn_temperature, max_examples=config.eval.max_examples)

  pending = []  # (step, device metrics) not yet checked or reported
  last = {}
  reporter.start_timer(start)
  with ckpt, preemption_watch() as preempted:
    for step in range(start, config.steps):
      state, metrics = update(state, parallel.to_global(next(batches), mesh))
      pending.append((step, metrics))
      done = step + 1
      final = done == config.steps
      if not final and preempted(done):
        last = {**_check_and_average(pending, done), "preempted_at_step": done}
        ckpt.save(done, state, meta)
        logging.warning("Preempted: saved a checkpoint at step %d; rerun the same command to "
                        "resume.", done)
        break
      if done % config.log_every_steps == 0 or final or done % config.checkpoint.every_steps == 0:
        # Checked before any save, so a checkpoint never holds a diverged state.
        last = _check_and_average(pending, done)
        pending = []
        if done % config.log_every_steps == 0 or final:
          reporter.write(done, last)
      if done % config.checkpoint.every_steps == 0 or final:
        ckpt.save(done, state, meta)
      if _eval_due(config.eval.every_steps, done, final):
        eval_metrics = run_eval(state)
        reporter.write(done, eval_metrics, timed=False)
        reporter.start_timer(done)  # evaluation time is not training speed
        last.update(eval_metrics)
  reporter.plot()
  return last


def load_pretrained(config, workdir: str, mesh):
  """The config and final TrainState of a pretraining run in `workdir`.

  The model part of the config comes from the checkpoint itself, so evaluation
  and export need no repeat of the pretraining overrides.
  """
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"No pretraining checkpoint in {os.path.join(workdir, 'checkpoints')}. Run "
        "--job=pretrain with this --workdir first, or point "
        "--config.linear_eval.pretrained_workdir at a finished run.")
  saved = ckpt.read_meta(step)["config"]
  config = config.copy_and_resolve_references()
  config.model = type(config.model)(saved["model"])
  for key in ("num_classes", "num_train_examples", "image_size"):
    config.data[key] = saved["data"][key]
  for key in ("steps", "warmup_steps", "batch_size"):
    config[key] = saved[key]
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = train_step.make_optimizer(config)
  state = create_state(config, nets, optimizer, mesh)
  step, state = ckpt.restore(checkpoint.abstract(state), checkpoint.architecture(config))
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints.")
  logging.info("Loaded the pretrained network from %s (step %d).", workdir, step)
  return config, nets, state


def _eval_due(every: int, done: int, final: bool) -> bool:
  """every > 0: periodically and at the end; 0: only at the end; < 0: never."""
  if every < 0:
    return False
  return final or (every > 0 and done % every == 0)


def _check_and_average(pending, done):
  """Fetches the pending step metrics; stops at the first non-finite loss."""
  fetched = [(step, parallel.fetch(m)) for step, m in pending]
  for step, m in fetched:
    if not np.isfinite(m["loss"]):
      raise NonFiniteLossError(
          f"The loss became {float(m['loss'])} at step {step + 1}; stopping. The last checkpoint "
          f"before it is kept. Lower --config.optimizer.base_lr or raise "
          f"--config.warmup_epochs, then rerun to resume from that checkpoint.")
  # Schedules are reported at the last step, everything else as the interval's mean.
  keys = fetched[-1][1].keys()
  return {k: float(fetched[-1][1][k]) if k in ("learning_rate", "tau")
          else float(np.mean([m[k] for _, m in fetched])) for k in keys}
