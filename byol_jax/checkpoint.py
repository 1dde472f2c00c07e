"""Checkpoints with orbax: atomic, keep the last k, resume from the newest good one.

Orbax writes each step into a temporary directory and renames it when complete,
so a step directory is never half-written, and it coordinates the processes of
a multi-host run. A checkpoint holds the whole TrainState (its step and RNG
included); the input pipeline is a pure function of the step, so nothing else is
needed to continue bit for bit. Beside the arrays we keep a small JSON record of
the model config, to refuse a checkpoint from another architecture with a clear
message rather than a shape error.
"""

import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from byol_jax.config_lib import ConfigError

# What must match for a checkpoint's arrays to fit the model.
_ARCH_FIELDS = ("depth", "width", "base_channels", "stem", "norm", "projector_hidden", "predictor_hidden",
                "projection_dim", "use_predictor")


def architecture(config) -> dict:
  arch = {k: config.model[k] for k in _ARCH_FIELDS}
  arch["num_classes"] = int(config.data.num_classes)
  return arch


class Checkpointer:
  """Saves and restores a state pytree under `directory` (local path or gs://)."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any, expected_arch: Optional[dict] = None
              ) -> Tuple[Optional[int], Any]:
    """Restores the newest readable checkpoint into the structure of `abstract_state`.

    Returns (step, state), or (None, None) when there is none. A checkpoint
    that cannot be read (corrupted on disk, say) is skipped with a warning in
    favour of the one before it.
    """
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
        logging.warning("Checkpoint at step %d in %s is unreadable (%s); trying an older one.",
                        step, self.directory, _short(e))
        continue
      if expected_arch is not None and meta.get("architecture") != expected_arch:
        raise ConfigError(
            f"The checkpoint in {self.directory} (step {step}) was written by a different model: "
            f"{_diff(meta.get('architecture') or {}, expected_arch)}. Use a fresh --workdir, or a "
            "config that matches the checkpoint.")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return step, restored["state"]
      except Exception as e:  # noqa: BLE001
        logging.warning("Checkpoint at step %d in %s could not be restored (%s); trying an "
                        "older one.", step, self.directory, _short(e))
    if steps:
      logging.warning("No readable checkpoint in %s; starting from scratch.", self.directory)
    return None, None

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # As a context manager it closes on any exit: an error must not abandon a
  # save in flight, or the last good checkpoint would never be committed.
  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def abstract(tree):
  """Shapes, dtypes and shardings of a pytree of arrays, for restoring into it."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _short(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _diff(saved: dict, expected: dict) -> str:
  keys = sorted(set(saved) | set(expected))
  diffs = [f"{k}={saved.get(k)!r} there vs {expected.get(k)!r} here" for k in keys
           if saved.get(k) != expected.get(k)]
  return "; ".join(diffs) or "unknown difference"
