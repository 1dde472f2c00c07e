"""The training loop shared by pretraining and linear evaluation.

update -> (every k steps) fetch the metrics, stop on a non-finite loss, report,
save -> evaluate, with one predicate, `itstime`, deciding every periodic action.
A preemption (SIGTERM from a scheduler, or Ctrl-C) saves a checkpoint and ends
the loop early; the caller turns that into the "rerun to resume" exit.

A resumed run first drops the metrics rows past its start step (it writes them
again), so the metrics file holds each step once. Each checkpoint records the
loss (`checkpoint.loss_record`); on a non-finite loss the checkpoints that were
already diverging are moved aside, so a rerun resumes from a sane one.
"""

import contextlib
import math
import signal
import threading
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from byol_jax.errors import NonFiniteLossError
from byol_jax.train import checkpoint, parallel

# Reported as the value at the step, not averaged over the interval.
_SCHEDULES = ("learning_rate", "tau")


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action is due once `step` of `total` steps are done.

  every > 0: every `every` steps and at the end; 0: only at the end; < 0: never.
  """
  if every < 0:
    return False
  return step == total or (every > 0 and step % every == 0)


class Every(NamedTuple):
  """Periods (see `itstime`) of the loop's actions."""
  log: int
  checkpoint: int
  eval: int = -1


@contextlib.contextmanager
def preemption_watch() -> Iterator[Callable[[int], bool]]:
  """Yields `preempted(step) -> bool`: True once SIGTERM or Ctrl-C asked this job to stop.

  SIGTERM is what SLURM, Kubernetes and spot/preemptible VMs send before they
  kill a job. In a multi-process job JAX's runtime catches it and agrees with
  every process on the step to stop at; a lone process watches for it here,
  and for a first Ctrl-C (SIGINT) too, unless SIGINT was ignored or handled
  by the program; a second Ctrl-C leaves at once (KeyboardInterrupt).
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: False
    return
  flag = threading.Event()

  def on_signal(signum, frame):
    del frame
    if flag.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    flag.set()
    again = " (Ctrl-C again leaves at once, without saving)" if signum == signal.SIGINT else ""
    logging.warning("%s: stopping after this step to save a checkpoint%s.",
                    signal.Signals(signum).name, again)

  watched = [signal.SIGTERM]
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    watched.append(signal.SIGINT)
  previous = {s: signal.signal(s, on_signal) for s in watched}
  try:
    yield lambda step: flag.is_set()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


class _LossHistory:
  """The losses a checkpoint's meta records: the run's lowest so far (carried
  over a resume) and the highest since the previous save."""

  def __init__(self, resumed_meta: dict):
    self.run_min = (resumed_meta.get("loss") or {}).get("run_min", math.inf)
    self.since_save_max = -math.inf

  def add(self, losses) -> None:
    self.run_min = min(self.run_min, *losses)
    self.since_save_max = max(self.since_save_max, *losses)

  def record(self) -> dict:
    rec = checkpoint.loss_record(self.since_save_max, self.run_min)
    self.since_save_max = -math.inf
    return rec


def train(state, *, update, batches, mesh, start: int, total: int, every: Every, reporter,
          ckpt, to_items: Callable, meta: dict, divergence_advice: str,
          evaluate: Optional[Callable] = None, watch: Optional[Callable] = None,
          profile: Tuple[int, ...] = (), profile_dir: str = ""):
  """Runs steps start..total-1 of `update`; returns (state, last metrics).

  The metrics gain `preempted_at_step` when SIGTERM or Ctrl-C stopped the loop
  early (after saving). `to_items(state)` gives the checkpoint items of a
  state; `meta` is saved beside them, with the loss record added. `watch(step,
  metrics)` sees every reported row (training and evaluation). `profile=(A, B)`
  traces steps A..B (1-based) with jax.profiler into `profile_dir`.
  """
  watch = watch or (lambda step, metrics: None)
  pending, last = [], {}
  history = _LossHistory(ckpt.read_meta(start) if start else {})
  reporter.drop_after(start)
  reporter.start_timer(start)
  with preemption_watch() as preempted, _Profiler(profile, profile_dir) as profiler:
    for step in range(start, total):
      profiler.before(step + 1)
      state, metrics = update(state, parallel.to_global(next(batches), mesh))
      done = step + 1
      profiler.after(done, state)
      pending.append((done, metrics))
      stop = done < total and preempted(done)
      log = stop or itstime(done, every.log, total)
      save = stop or itstime(done, every.checkpoint, total)
      if log or save:
        # Checked before any save, so a checkpoint never holds a non-finite state.
        last = _check_and_average(pending, history, ckpt, divergence_advice)
        pending = []
      if log:
        reporter.write(done, last)
        watch(done, last)
      if save:
        reporter.flush()  # on gs://, the rows up to a checkpoint are written before it
        ckpt.save(done, to_items(state), {**meta, "loss": history.record()})
      if stop:
        return state, {**last, "preempted_at_step": done}
      if evaluate is not None and itstime(done, every.eval, total):
        eval_metrics = evaluate(state)
        reporter.write(done, eval_metrics, timed=False)
        watch(done, eval_metrics)
        reporter.start_timer(done)  # evaluation time is not training speed
        last.update(eval_metrics)
  return state, last


class _Profiler:
  """A jax.profiler trace of steps first..last: started before step `first`, stopped once
  step `last`'s state is computed (or when the loop ends early)."""

  def __init__(self, steps: Tuple[int, ...], log_dir: str):
    self.steps, self.log_dir, self.tracing = tuple(steps), log_dir, False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.log_dir)
      self.tracing = True

  def after(self, step: int, state) -> None:
    if self.tracing and step == self.steps[1]:
      jax.block_until_ready(state)
      self._stop()
      logging.info("Wrote a profile of steps %d-%d under %s (TensorBoard: its profile tab).",
                   *self.steps, self.log_dir)

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self.tracing = False

  def __enter__(self) -> "_Profiler":
    return self

  def __exit__(self, *exc) -> None:
    if self.tracing:
      self._stop()


def _check_and_average(pending, history: _LossHistory, ckpt, advice: str) -> dict:
  """Fetches the pending step metrics; stops at the first non-finite loss."""
  fetched = [(step, parallel.fetch(m)) for step, m in pending]
  for step, m in fetched:
    if not np.isfinite(m["loss"]):
      raise NonFiniteLossError(f"The loss became {float(m['loss'])} at step {step}; stopping. "
                               f"{_set_aside_diverged(ckpt)} {advice}")
  history.add([float(m["loss"]) for _, m in fetched])
  keys = fetched[-1][1].keys()
  return {k: float(fetched[-1][1][k]) if k in _SCHEDULES
          else float(np.mean([m[k] for _, m in fetched])) for k in keys}


def _set_aside_diverged(ckpt) -> str:
  """Moves aside the checkpoints saved while the loss was already blowing up; says
  where a rerun will resume."""
  moved = ckpt.set_aside_diverged()
  text = ""
  if moved:
    text = ("Moved aside the checkpoints saved while the loss was already far above the run's "
            "lowest: " + ", ".join(f"step {s} (loss {loss:.3g}) to {path}"
                                    for s, loss, path in moved) + ". ")
  steps = ckpt.steps()
  if steps:
    return text + f"A rerun resumes from the checkpoint at step {steps[0]}."
  return text + "No checkpoint is left, so a rerun starts from step 0."
