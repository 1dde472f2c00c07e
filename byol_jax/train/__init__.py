"""One update step and the loop that runs it, across devices and restarts.

`train_step` (`TrainState` and the jitted update: loss, LARS, EMA), `optim`
(LARS and the lr / tau schedules), `parallel` (mesh, shardings,
`jax.distributed`), `loop` (periodic actions, preemption), `checkpoint`
(orbax) and `workdir_lock` (one run per workdir). May import `model`, `views`
and the shared utilities.
"""
