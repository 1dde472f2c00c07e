"""Checkpoints with orbax: atomic, keep the last k, resume from the newest good one.

Orbax writes each step into a temporary directory and renames it when complete,
so a step directory is never half-written, and it coordinates the processes of
a multi-host run. A pretraining checkpoint holds the TrainState as two items:

* `online`: the online network's parameters and state, all that evaluation
  and export read (so they never rebuild the optimizer);
* `train`: the rest (step, RNG, target network, optimizer state).

The input pipeline is a pure function of the step, so nothing else is needed
to continue bit for bit. Beside the arrays, `meta` is a small JSON record of
the architecture, the config, the settings that fix the run's trajectory and
the loss: a checkpoint from another architecture is refused with a clear
message rather than a shape error, one from other settings unless the user
allows it (`restore`).

Nothing here deletes a checkpoint except orbax's keep-the-last-k. A checkpoint
that cannot be read is moved aside to `unreadable-<step>/`, one written after
the loss had already blown up to `diverged-<step>/` (see `vouched`), both
beside the good ones, kept for inspection, with a warning naming them.

Checkpoints of pre-release byol_jax (before 0.1.0: one item `state`, or an
architecture without `padding`, `head_norm` and `head_bias`) are refused with
a one-line ConfigError (`refuse_pre_release`), not read.
"""

import os
from typing import Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from byol_jax import remote
from byol_jax.errors import ConfigError
from byol_jax.model import networks
from byol_jax.train import parallel
from byol_jax.train.train_step import TrainState

# What must match for a checkpoint's arrays to fit the model.
_ARCH_FIELDS = ("depth", "width", "base_channels", "stem", "norm", "padding", "projector_hidden",
                "predictor_hidden", "projection_dim", "head_norm", "head_bias", "use_predictor")
# What marks a checkpoint of pre-release byol_jax: the whole TrainState as one item, or an
# architecture record without the model fields 0.1.0 added.
_PRE_RELEASE_ITEM = "state"
_PRE_RELEASE_MISSING = ("padding", "head_norm", "head_bias")
# See `vouched`: how far above the run's lowest loss a checkpoint's loss may be.
DIVERGED_FACTOR = 10.0


def architecture(config) -> dict:
  arch = {k: config.model[k] for k in _ARCH_FIELDS}
  arch["num_classes"] = int(config.data.num_classes)
  return arch


def loss_record(interval_max: float, run_min: float) -> dict:
  """The loss part of a checkpoint's meta: the highest loss of the steps fetched
  up to the save, and the lowest loss of the run so far (see `vouched`)."""
  return {"interval_max": interval_max, "run_min": run_min}


def vouched(meta: dict) -> bool:
  """Whether a checkpoint's loss was sane when it was saved.

  Rule: its `interval_max` is at most DIVERGED_FACTOR x (1 + the run's lowest
  loss so far). BYOL's and a classifier's losses are >= 0 and O(1-10) while
  training is healthy; a run on its way to NaN is orders of magnitude above.
  Checkpoints without a loss record (older ones) are vouched for.
  """
  loss = meta.get("loss")
  if not loss:
    return True
  return loss["interval_max"] <= DIVERGED_FACTOR * (1.0 + max(loss["run_min"], 0.0))


def state_items(state: TrainState) -> dict:
  """A TrainState as the checkpoint's `online` and `train` items."""
  return {"online": {"params": state.online_params, "state": state.online_state},
          "train": {"step": state.step, "rng": state.rng, "target_params": state.target_params,
                    "target_state": state.target_state, "opt_state": state.opt_state}}


def state_from_items(items: dict) -> TrainState:
  online, train = items["online"], items["train"]
  return TrainState(online_params=online["params"], online_state=online["state"], **train)


class Checkpointer:
  """Saves and restores named pytrees (items) under `directory` (local path or gs://)."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = directory
    if remote.is_gcs(directory):
      from byol_jax import gcs_fsspec  # pylint: disable=g-import-not-at-top  # needs fsspec
      gcs_fsspec.install()  # orbax's gs:// files through byol_jax's one Cloud Storage client
    # The directory appears with the first save, so a run that fails earlier leaves none.
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False))

  def save(self, step: int, items: dict, meta: dict) -> None:
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
                      force=True)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def has_item(self, step: int, name: str) -> bool:
    return (self.manager.directory / str(step) / name).exists()

  def restore(self, abstract_items: dict, expected_arch: Optional[dict] = None, *,
              expected_settings: Optional[dict] = None, allow_changed: bool = False
              ) -> Tuple[Optional[int], Optional[dict]]:
    """Restores the newest readable checkpoint into the structure of `abstract_items`.

    Returns (step, items), or (None, None) when there is none. A checkpoint
    that cannot be read is moved aside (`unreadable-<step>`) in favour of the
    one before it. One of another architecture is refused (ConfigError), and
    so is one whose `settings` differ from `expected_settings`, unless
    `allow_changed`.
    """
    steps = self.steps()
    for step in steps:
      try:
        meta = self.read_meta(step)
      except Exception as e:  # noqa: BLE001 - whatever the damage, the step is unusable
        self.set_aside(step, "unreadable", _short(e))
        continue
      whole_state = (set(abstract_items) == {"online", "train"}
                     and self.has_item(step, _PRE_RELEASE_ITEM))
      self._check_compatible(step, meta, expected_arch, expected_settings, allow_changed,
                             whole_state)
      try:
        return step, self._restore_items(step, abstract_items)
      except Exception as e:  # noqa: BLE001
        self.set_aside(step, "unreadable", _short(e))
    if steps:
      logging.warning("NO READABLE CHECKPOINT in %s (all moved aside, see above); the run STARTS "
                      "OVER from step 0.", self.directory)
    return None, None

  def _check_compatible(self, step: int, meta: dict, arch: Optional[dict],
                        expected: Optional[dict], allow_changed: bool,
                        whole_state: bool = False) -> None:
    where = f"The checkpoint in {self.directory} (step {step})"
    refuse_pre_release(where, whole_state, meta.get("architecture"), arch)
    saved_arch = dict(meta.get("architecture") or {})
    if arch is not None and saved_arch != arch:
      raise ConfigError(
          f"{where} was written by a different model: {_diff(saved_arch, arch)}. Use a fresh "
          "--workdir, or a config that matches the checkpoint (--config.model.FIELD=...).")
    saved = _saved_settings(meta, expected)
    if expected is None or saved is None or saved == expected:
      return
    if not allow_changed:
      raise ConfigError(
          f"{where} was written with other settings, and resuming would change the run's "
          f"trajectory: {_diff(saved, expected)}. Restore those settings, use a fresh --workdir, "
          "or pass --allow_changed_resume to resume with the new ones.")
    logging.warning("%s was written with other settings; resuming with the new ones as "
                    "--allow_changed_resume asks: %s.", where, _diff(saved, expected))

  def set_aside(self, step: int, label: str, reason: str) -> str:
    """Moves a step's directory to `<label>-<step>` beside it, kept for inspection."""
    src = self.manager.directory / str(step)
    dst = self.manager.directory / f"{label}-{step}"
    n = 1
    while dst.exists():
      dst, n = self.manager.directory / f"{label}-{step}.{n}", n + 1
    if jax.process_index() == 0:
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"byol_jax set aside {step}")
    self.manager.reload()
    logging.warning("Checkpoint at step %d in %s is %s (%s): moved it to %s, kept for inspection "
                    "(delete it when done).", step, self.directory, label, reason, dst)
    return str(dst)

  def set_aside_diverged(self) -> list:
    """Moves aside the checkpoints `vouched` rejects; returns [(step, their loss, new path)]."""
    self.manager.wait_until_finished()
    self.manager.reload()
    moved = []
    for step in self.manager.all_steps():
      try:
        meta = self.read_meta(step)
      except Exception:  # noqa: BLE001 - an unreadable one is moved aside at the next restore
        continue
      if not vouched(meta):
        loss = meta["loss"]
        why = (f"its loss {loss['interval_max']:.3g} was already far above the run's lowest, "
               f"{loss['run_min']:.3g}")
        moved.append((step, loss["interval_max"], self.set_aside(step, "diverged", why)))
    return moved

  def _restore_items(self, step: int, abstract_items: dict) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}))
    return {name: restored[name] for name in abstract_items}

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def steps(self) -> list:
    """The committed steps, newest first."""
    self.manager.reload()
    return sorted(self.manager.all_steps(), reverse=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # As a context manager it closes on any exit: an error must not abandon a
  # save in flight, or the last good checkpoint would never be committed.
  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def refuse_pre_release(where: str, whole_state_item: bool, saved_arch: Optional[dict],
                       expected_arch: Optional[dict]) -> None:
  """Raises ConfigError for a checkpoint that pre-release byol_jax (before 0.1.0) wrote:
  its TrainState in one item, or its architecture without fields `expected_arch` has."""
  missing = [k for k in _PRE_RELEASE_MISSING
             if saved_arch is not None and k in (expected_arch or {}) and k not in saved_arch]
  if whole_state_item or missing:
    mark = (f"one item '{_PRE_RELEASE_ITEM}'" if whole_state_item
            else "no model." + "/".join(missing) + " in its architecture")
    raise ConfigError(
        f"{where} was written by pre-release byol_jax (before 0.1.0: {mark}), which "
        "byol_jax 0.1.0 and later do not read. Pretrain again in a fresh --workdir, or use "
        "the pre-release checkout that wrote it.")


def abstract(tree):
  """Shapes, dtypes and shardings of a pytree of arrays, for restoring into it."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def save_online(workdir: str, step: int, params, state, config) -> None:
  """Writes a checkpoint of an online network alone (e.g. imported weights), which
  `load_pretrained` reads as it reads a pretraining run."""
  meta = {"architecture": architecture(config), "config": config.to_dict()}
  with Checkpointer(checkpoint_dir(workdir), keep=1) as ckpt:
    ckpt.save(step, {"online": {"params": params, "state": state}}, meta)


def load_pretrained(config, workdir: str, mesh):
  """The pretrained online network in `workdir`: (config, nets, params, state).

  The model part of the config (and the image size and classes) comes from the
  checkpoint itself, so evaluation and export need no repeat of the pretraining
  overrides; every other field stays as given. An unreadable checkpoint is
  skipped (with a warning, left where it is: this may be another run's
  workdir) for the one before it.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory) and "://" not in directory:
    raise FileNotFoundError(_no_checkpoint_message(directory))
  with Checkpointer(directory) as ckpt:
    steps = ckpt.steps()
    for step in steps:
      try:
        meta = ckpt.read_meta(step)
        saved = meta["config"]
      except Exception as e:  # noqa: BLE001 - whatever the damage, try the one before
        _warn_unreadable(step, directory, e)
        continue
      refuse_pre_release(f"The checkpoint in {directory} (step {step})",
                         ckpt.has_item(step, _PRE_RELEASE_ITEM), meta.get("architecture"),
                         architecture(config))
      config, nets, target = _online_target(config, saved, mesh)
      try:
        online = _restore_online(ckpt, step, target)
      except Exception as e:  # noqa: BLE001
        _warn_unreadable(step, directory, e)
        continue
      logging.info("Loaded the pretrained network from %s (step %d).", workdir, step)
      return config, nets, online["params"], online["state"]
  if steps:
    raise FileNotFoundError(f"No readable checkpoint in {directory} (see the warnings above). "
                            "Rerun --job=pretrain with this --workdir to resume or redo it.")
  raise FileNotFoundError(_no_checkpoint_message(directory))


def _online_target(config, saved: dict, mesh):
  """(config with the checkpoint's model, networks, the online network's abstract tree)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = type(config.model)(saved["model"])
    for key in ("num_classes", "num_train_examples", "image_size"):
      config.data[key] = saved["data"][key]
  nets = networks.make_networks(config.model, config.data.num_classes)
  size = config.data.image_size
  shapes = jax.eval_shape(lambda rng, images: nets.online.init(rng, images, True),
                          jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((2, size, size, 3), jax.numpy.float32))
  sharding = parallel.replicated(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        {"params": shapes[0], "state": shapes[1]})
  return config, nets, target


def _restore_online(ckpt: Checkpointer, step: int, target: dict) -> dict:
  return ckpt.manager.restore(step, args=ocp.args.Composite(
      online=ocp.args.StandardRestore(target)))["online"]


def _warn_unreadable(step: int, directory: str, e: Exception) -> None:
  logging.warning("Checkpoint at step %d in %s is unreadable (%s); trying an older one.", step,
                  directory, _short(e))


def _no_checkpoint_message(directory: str) -> str:
  return (f"No pretraining checkpoint in {directory}. Run --job=pretrain with this --workdir "
          "first, or point --config.linear_eval.pretrained_workdir at a finished run.")


def _short(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _saved_settings(meta: dict, expected: Optional[dict]) -> Optional[dict]:
  """The checkpoint's values of the `expected` settings; a setting it predates is taken as
  unchanged (its `config` stands in for `settings` written before the setting was compared)."""
  saved = meta.get("settings")
  if expected is None or saved is None:
    return saved
  config = _flatten(meta.get("config") or {})
  return {k: saved.get(k, config.get(k, v)) for k, v in expected.items()}


def _diff(saved: dict, expected: dict) -> str:
  keys = sorted(set(saved) | set(expected))
  diffs = [f"{k}={saved.get(k)!r} there vs {expected.get(k)!r} here" for k in keys
           if saved.get(k) != expected.get(k)]
  return "; ".join(diffs) or "unknown difference"
