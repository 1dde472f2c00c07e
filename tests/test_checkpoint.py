"""Checkpoints: round trip, keep-last-k, fallback past a corrupt step, architecture check."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import checkpoint
from byol_jax.config_lib import ConfigError


def _state(value):
  return {"step": jnp.asarray(value, jnp.int32), "w": jnp.full((3, 4), float(value)),
          "nested": {"b": jnp.arange(5.0) + value}}


ARCH = {"depth": 18, "width": 1}


def test_round_trip_and_keep_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"architecture": ARCH})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 3]
  step, restored = ckpt.restore(checkpoint.abstract(_state(0)), ARCH)
  ckpt.close()
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, restored, _state(3))


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.restore(checkpoint.abstract(_state(0)), ARCH) == (None, None)


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(step), {"architecture": ARCH})
  ckpt.close()
  # Damage every array file of the newest step, as a failing disk would.
  damaged = 0
  for root, _, files in os.walk(directory / "2" / "state"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
      damaged += 1
  assert damaged
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  with caplog.at_level("WARNING"):
    step, restored = ckpt.restore(checkpoint.abstract(_state(0)), ARCH)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored, _state(1))
  assert any("step 2" in r.getMessage() for r in caplog.records)


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(5, _state(5), {"architecture": {"depth": 50, "width": 1}})
  ckpt.wait()
  with pytest.raises(ConfigError) as e:
    ckpt.restore(checkpoint.abstract(_state(0)), ARCH)
  assert "depth=50 there vs 18 here" in str(e.value)
  assert "fresh --workdir" in str(e.value)
