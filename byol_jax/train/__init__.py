"""One update step and the loop that runs it, across devices and restarts.

`train_step` (`TrainState` and the jitted update: loss, LARS, EMA), `linear_step`
(the linear-eval / fine-tune classifier's step), `optim` (LARS and the lr / tau
schedules), `parallel` (mesh, shardings, `jax.distributed`), `loop` (periodic
actions, preemption), `checkpoint` (orbax) and `workdir_lock` (one run per
workdir); for `--job=compile`: `topology` (Cloud TPU slices as compile-only
devices), `compile` (the steps lowered and compiled for them, and what the
compiler reports) and `roofline` (chip peaks and the roofline estimate). May
import `data`, `model`, `views` and the shared utilities.
"""
