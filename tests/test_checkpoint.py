"""Checkpoints: round trip, keep-last-k, fallback past a corrupt step, architecture check."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.errors import ConfigError
from byol_jax.train import checkpoint


def _state(value):
  return {"step": jnp.asarray(value, jnp.int32), "w": jnp.full((3, 4), float(value)),
          "nested": {"b": jnp.arange(5.0) + value}}


ARCH = {"depth": 18, "width": 1}


def test_round_trip_and_keep_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, {"state": _state(step)}, {"architecture": ARCH})
  ckpt.manager.wait_until_finished()
  assert sorted(ckpt.manager.all_steps()) == [2, 3]
  step, restored = ckpt.restore({"state": checkpoint.abstract(_state(0))}, ARCH)
  ckpt.close()
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, restored["state"], _state(3))


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.restore({"state": checkpoint.abstract(_state(0))}, ARCH) == (None, None)


def _damage(step_dir, how: str) -> int:
  """Damages a checkpoint step on disk, as a failing disk or a stray `rm` would."""
  damaged = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if how == "truncate":
        with open(path, "r+b") as f:
          f.truncate(max(os.path.getsize(path) // 3, 1))
      elif how == "delete" and ("ocdbt" in root or name == "metadata"):
        os.remove(path)
      else:
        continue
      damaged += 1
  assert damaged, f"nothing to damage in {step_dir}"
  return damaged


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_unreadable_latest_is_moved_aside_and_its_step_saved_again(tmp_path, caplog, how):
  """The run resumes from the step before, keeps the damaged one for inspection, and can
  save the damaged step's number again (it used to die with "already exists")."""
  directory = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  for step in (1, 2):
    ckpt.save(step, {"state": _state(step)}, {"architecture": ARCH})
  ckpt.close()
  _damage(directory / "2", how)
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  with caplog.at_level("WARNING"):
    step, restored = ckpt.restore({"state": checkpoint.abstract(_state(0))}, ARCH)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored["state"], _state(1))
  assert (directory / "unreadable-2").is_dir() and not (directory / "2").exists()
  assert any("step 2" in r.getMessage() and "unreadable-2" in r.getMessage()
             for r in caplog.records)
  ckpt.save(2, {"state": _state(2)}, {"architecture": ARCH})
  ckpt.close()
  assert sorted(checkpoint.Checkpointer(str(directory)).steps()) == [1, 2]


def test_all_unreadable_starts_over_loudly_and_keeps_them(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(str(directory), keep=3) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {"state": _state(step)}, {"architecture": ARCH})
  for step in (1, 2):
    _damage(directory / str(step), "truncate")
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  with caplog.at_level("WARNING"):
    assert ckpt.restore({"state": checkpoint.abstract(_state(0))}, ARCH) == (None, None)
  assert any("STARTS OVER" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(directory)) == ["unreadable-1", "unreadable-2"]
  ckpt.save(1, {"state": _state(1)}, {"architecture": ARCH})  # the first save of the rerun
  ckpt.close()


def test_a_second_set_aside_of_a_step_does_not_overwrite_the_first(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(str(directory)) as ckpt:
    for _ in range(2):
      ckpt.save(3, {"state": _state(3)}, {"architecture": ARCH})
      ckpt.manager.wait_until_finished()
      ckpt.set_aside(3, "unreadable", "test")
  assert sorted(os.listdir(directory)) == ["unreadable-3", "unreadable-3.1"]


def test_no_directory_until_the_first_save(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.restore({"state": checkpoint.abstract(_state(0))}, ARCH) == (None, None)
  ckpt.close()
  assert not os.path.exists(tmp_path / "ckpt")


@pytest.mark.parametrize("interval_max, run_min, expected", [
    (6.5, 6.3, True), (60.0, 5.0, True), (70.0, 5.0, False), (6e10, 6.3, False),
    (9.0, 0.0, True), (11.0, 0.0, False)])
def test_vouched_rule(interval_max, run_min, expected):
  meta = {"loss": checkpoint.loss_record(interval_max, run_min)}
  assert checkpoint.vouched(meta) is expected
  assert checkpoint.vouched({}) is True  # written before losses were recorded


def test_diverged_checkpoints_are_moved_aside_and_the_sane_ones_kept(tmp_path):
  directory = tmp_path / "ckpt"
  losses = {2: (6.3, 6.3), 4: (5.0, 4.0), 6: (6e10, 4.0), 8: (1e20, 4.0)}
  with checkpoint.Checkpointer(str(directory), keep=5) as ckpt:
    for step, (high, low) in losses.items():
      ckpt.save(step, {"state": _state(step)}, {"loss": checkpoint.loss_record(high, low)})
    moved = ckpt.set_aside_diverged()
    assert [(s, loss) for s, loss, _ in moved] == [(6, 6e10), (8, 1e20)]
    assert ckpt.steps() == [4, 2]
  assert sorted(os.listdir(directory)) == ["2", "4", "diverged-6", "diverged-8"]


SETTINGS = {"batch_size": 16, "steps": 8, "augment.view1.flip_prob": 0.5}


def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(5, {"state": _state(5)}, {"architecture": ARCH, "settings": SETTINGS})
  ckpt.manager.wait_until_finished()
  changed = {**SETTINGS, "batch_size": 32, "steps": 10}
  abstract = {"state": checkpoint.abstract(_state(0))}
  with pytest.raises(ConfigError) as e:
    ckpt.restore(abstract, ARCH, expected_settings=changed)
  assert "batch_size=16 there vs 32 here; steps=8 there vs 10 here" in str(e.value)
  assert "--allow_changed_resume" in str(e.value)
  assert ckpt.restore(abstract, ARCH, expected_settings=SETTINGS)[0] == 5
  with caplog.at_level("WARNING"):
    assert ckpt.restore(abstract, ARCH, expected_settings=changed, allow_changed=True)[0] == 5
  assert any("batch_size=16 there vs 32 here" in r.getMessage() for r in caplog.records)
  ckpt.close()


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(5, {"state": _state(5)}, {"architecture": {"depth": 50, "width": 1}})
  ckpt.manager.wait_until_finished()
  with pytest.raises(ConfigError) as e:
    ckpt.restore({"state": checkpoint.abstract(_state(0))}, ARCH)
  assert "depth=50 there vs 18 here" in str(e.value)
  assert "fresh --workdir" in str(e.value)


def _tiny_train_state():
  from byol_jax.model import networks  # pylint: disable=g-import-not-at-top
  from byol_jax.train import optim, parallel, train_step
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  nets = networks.make_networks(config.model, config.data.num_classes)
  return config, mesh, train_step.create_state(config, nets, optim.make_optimizer(config), mesh)


@pytest.mark.parametrize("layout", ["one_state_item", "architecture_without_padding"])
def test_a_pre_release_checkpoint_is_refused_in_one_line_naming_its_version(tmp_path, layout):
  """Pre-release byol_jax (before 0.1.0) saved the whole TrainState as one item `state`, and
  an architecture without padding / head_norm / head_bias: resuming and evaluation both
  refuse such a checkpoint, saying which version wrote it, and leave it where it is."""
  config, mesh, state = _tiny_train_state()
  workdir = str(tmp_path)
  arch = checkpoint.architecture(config)
  if layout == "architecture_without_padding":
    arch = {k: v for k, v in arch.items() if k not in ("padding", "head_norm", "head_bias")}
    items = checkpoint.state_items(state)
  else:
    items = {"state": state}
  meta = {"architecture": arch, "config": config.to_dict()}
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir)) as ckpt:
    ckpt.save(7, items, meta)

  expected = r"\(step 7\) was written by pre-release byol_jax \(before 0\.1\.0: "
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir)) as ckpt:
    with pytest.raises(ConfigError, match=expected) as e:
      ckpt.restore(checkpoint.abstract(checkpoint.state_items(state)),
                   checkpoint.architecture(config))
  assert "\n" not in str(e.value) and "fresh --workdir" in str(e.value)
  with pytest.raises(ConfigError, match=expected):
    checkpoint.load_pretrained(config, workdir, mesh)
  assert os.listdir(checkpoint.checkpoint_dir(workdir)) == ["7"]  # refused, not moved aside


def test_evaluation_reads_only_the_online_item(tmp_path):
  """A checkpoint with the `online` item alone (as an import writes) is a pretrained run."""
  config, mesh, state = _tiny_train_state()
  checkpoint.save_online(str(tmp_path), 3, state.online_params, state.online_state, config)
  assert not os.path.exists(tmp_path / "checkpoints" / "3" / "train")
  loaded_config, _, params, net_state = checkpoint.load_pretrained(config, str(tmp_path), mesh)
  assert loaded_config.model.depth == config.model.depth
  jax.tree.map(np.testing.assert_array_equal, (params, net_state),
               (state.online_params, state.online_state))


def test_load_pretrained_on_an_empty_workdir_creates_nothing(tmp_path):
  config, mesh, _ = _tiny_train_state()
  with pytest.raises(FileNotFoundError, match="No pretraining checkpoint"):
    checkpoint.load_pretrained(config, str(tmp_path / "empty"), mesh)
  assert not os.path.exists(tmp_path / "empty")
