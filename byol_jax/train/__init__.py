"""One update step and the loop that runs it, across devices and restarts.

`train_step` (`TrainState` and the jitted update: loss, LARS, EMA), `linear_step`
(the linear-eval / fine-tune classifier's step), `optim` (LARS and the lr / tau
schedules), `parallel` (mesh, shardings, `jax.distributed`), `loop` (periodic
actions, preemption), `checkpoint` (orbax) and `workdir_lock` (one run per
workdir). May import `data`, `model`, `views` and the shared utilities.
"""
