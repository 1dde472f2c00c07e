"""The pretraining job: data -> update step -> metrics and checkpoints.

Every process runs this same loop over its own shard of each global batch: the
step is `train_step.make_update_fn`, the data `input_pipeline.pretrain_batches`
(a pure function of the step, which is why resuming needs only the TrainState),
the loop `loop.train`.
"""

import os

import jax
from absl import logging

from byol_jax import config_fields, config_lib, fileio, reporting
from byol_jax.data import input_pipeline
from byol_jax.evaluate import evaluation
from byol_jax.model import networks
from byol_jax.train import checkpoint, loop, optim, train_step
from byol_jax.views import device_augment

DIVERGENCE_ADVICE = ("Lower --config.optimizer.base_lr or raise --config.warmup_epochs and rerun "
                     "the command with that change.")
COLLAPSE_ADVICE = ("Remedy: rerun in a new workdir with zero-initialised residual branches "
                   "(--config.model.zero_init_residual=True) or a smaller "
                   "--config.optimizer.base_lr (halve it); see README.md, "
                   "'When the collapse monitor falls'.")


def run(config, workdir: str, mesh, allow_changed_resume: bool = False) -> dict:
  """Pretrains (or resumes) in `workdir`; returns the last metrics.

  Resuming with other trajectory settings than the checkpoint's (`config_fields`)
  is refused unless `allow_changed_resume`.
  """
  # --- Setup: config, networks, state ---
  config = config_lib.prepare(config, mesh)
  chief = jax.process_index() == 0
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = optim.make_optimizer(config)
  state = train_step.create_state(config, nets, optimizer, mesh)

  # --- Resume from the newest readable checkpoint ---
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=config.checkpoint.keep)
  arch = checkpoint.architecture(config)
  settings = config_fields.settings("pretrain", config.to_dict())
  start, restored = ckpt.restore(checkpoint.abstract(checkpoint.state_items(state)), arch,
                                 expected_settings=settings, allow_changed=allow_changed_resume)
  if restored is not None:
    state = checkpoint.state_from_items(restored)
    logging.info("Resumed from the checkpoint at step %d.", start)
  start = start or 0
  if chief:
    config_path = os.path.join(workdir, "config.json")
    fileio.write_text(config_path, config.to_json_best_effort(indent=2))
    print(f"[pretrain] config: {config_path}; {config.steps} steps of {config.batch_size}",
          flush=True)
    size = networks.size(nets, state.online_params, state.online_state, config.data.image_size)
    print(f"[pretrain] model: {networks.size_line(size, config.data.image_size)}", flush=True)

  # --- Step, data, evaluation ---
  update = train_step.make_update_fn(config, nets, optimizer, mesh,
                                     device_augment.make_augment_fn(config))
  embed = train_step.make_embed_fn(nets, mesh)
  batches = input_pipeline.pretrain_batches(
      config, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())

  def evaluate(state):
    return evaluation.evaluate_on_splits(config, embed, state.online_params, state.online_state,
                                         mesh, train_split=evaluation.periodic_train_split(config))

  # --- Train ---
  reporter = reporting.Reporter(workdir, total_steps=config.steps, batch_size=config.batch_size,
                                enabled=chief)
  watch = evaluation.CollapseWatch(COLLAPSE_ADVICE) if chief else None
  for row in reporter.rows(until=start) if watch else []:  # the run's best before a resume
    watch(row["step"], row)
  with ckpt:
    _, last = loop.train(
        state, update=update, batches=batches, mesh=mesh, start=start, total=config.steps,
        every=loop.Every(config.log_every_steps, config.checkpoint.every_steps,
                         config.eval.every_steps),
        reporter=reporter, ckpt=ckpt, to_items=checkpoint.state_items,
        meta={"architecture": arch, "config": config.to_dict(), "settings": settings},
        divergence_advice=DIVERGENCE_ADVICE, evaluate=evaluate, watch=watch,
        profile=tuple(config.profile_steps), profile_dir=os.path.join(workdir, "tensorboard"))
  reporter.plot()
  return last
