"""Issue 29, item 6: every config field is classified for a resume, and the check uses it."""

import jax.numpy as jnp
import pytest

from byol_jax import config_fields, config_lib
from byol_jax.errors import ConfigError
from byol_jax.train import checkpoint

KINDS = (config_fields.TRAJECTORY, config_fields.ALLOWED, config_fields.NOT_APPLICABLE)


def named_leaves():
  """{dotted field: the named configs that have it}, over every named config's real tree."""
  found = {}
  for name in config_lib.available():
    for field, _ in config_fields.leaves(config_lib.load(name).to_dict()):
      found.setdefault(field, []).append(name)
  return found


def test_every_leaf_of_every_named_config_is_classified():
  missing = {f: names for f, names in named_leaves().items() if f not in config_fields.FIELDS}
  assert not missing, (
      "Unclassified config field(s): " + ", ".join(f"{f} (in {', '.join(n)})"
                                                   for f, n in sorted(missing.items()))
      + ". Add a row for each to FIELDS in byol_jax/config_fields.py: refused, allowed (with "
      "why) or n/a, for pretrain and for linear_eval.")


def test_every_row_names_a_real_field_with_kinds_and_a_reason():
  stale = sorted(set(config_fields.FIELDS) - set(named_leaves()))
  assert not stale, f"FIELDS in byol_jax/config_fields.py names fields no config has: {stale}"
  for field, (pretrain, linear_eval, why) in config_fields.FIELDS.items():
    assert pretrain in KINDS and linear_eval in KINDS and why.strip(), field


@pytest.mark.parametrize("field", ["base_tau", "optimizer.weight_decay", "compute_dtype",
                                   "model.views_in_one_pass", "augment.view2.solarize_prob",
                                   "data.train_split", "seed", "steps"])
def test_the_issue_s_trajectory_fields_are_refused_on_pretrain_resume(field):
  assert config_fields.kind("pretrain", field) == config_fields.TRAJECTORY


def test_an_unknown_field_counts_as_trajectory():
  assert config_fields.kind("pretrain", "model.a_field_added_tomorrow") == config_fields.TRAJECTORY
  assert "x.y" in config_fields.settings("pretrain", {"x": {"y": 1}, "log_every_steps": 5})


def test_settings_hold_the_trajectory_leaves_as_json_values():
  config = config_lib.load("demo").to_dict()
  pretrain = config_fields.settings("pretrain", config)
  crop_area = config["augment"]["view1"]["crop_area"]
  assert isinstance(crop_area, tuple)
  assert pretrain["augment.view1.crop_area"] == list(crop_area)  # as the JSON meta holds it
  assert "base_tau" in pretrain and "optimizer.base_lr" not in pretrain
  assert "eval.every_steps" not in pretrain and "linear_eval.epochs" not in pretrain
  linear = config_fields.settings("linear_eval", config)
  assert "linear_eval.encoder_lr_multiplier" in linear and "base_tau" not in linear
  assert "linear_eval.base_lr" not in linear  # it names the run's folder


def _resume(tmp_path, saved_meta, config):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, {"state": {"w": jnp.ones(2)}}, saved_meta)
  ckpt.manager.wait_until_finished()
  try:
    return ckpt.restore({"state": {"w": checkpoint.abstract(jnp.ones(2))}},
                        expected_settings=config_fields.settings("pretrain", config))[0]
  finally:
    ckpt.close()


def _changed(**fields):
  config = config_lib.load("demo")
  for dotted, value in fields.items():
    node = config
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config.to_dict()


def test_resume_refuses_a_trajectory_change_and_allows_the_remedy_and_logging(tmp_path):
  config = config_lib.load("demo").to_dict()
  meta = {"settings": config_fields.settings("pretrain", config), "config": config}
  with pytest.raises(ConfigError, match=r"base_tau=0\.99 there vs 0\.996 here.*"
                                        r"optimizer\.weight_decay=1e-05 there vs 0\.0001 here"):
    _resume(tmp_path / "a", meta, _changed(base_tau=0.996, optimizer__weight_decay=1e-4))
  allowed = _changed(optimizer__base_lr=0.1, warmup_epochs=1.0, log_every_steps=7,
                     eval__every_steps=3, checkpoint__every_steps=5)
  assert _resume(tmp_path / "b", meta, allowed) == 3


def test_a_checkpoint_from_before_the_table_is_checked_against_its_saved_config(tmp_path):
  """Its `settings` held only the old hand-kept list: a field added to them since is read
  from its saved config; a field its config lacks too (added later) is taken as unchanged."""
  config = config_lib.load("demo").to_dict()
  old_settings = {k: v for k, v in config_fields.settings("pretrain", config).items()
                  if k in ("seed", "batch_size")}
  old_config = {k: v for k, v in config.items() if k != "compute_dtype"}
  meta = {"settings": old_settings, "config": old_config}
  with pytest.raises(ConfigError, match=r"base_tau=0\.99 there vs 0\.5 here"):
    _resume(tmp_path / "a", meta, _changed(base_tau=0.5))
  assert _resume(tmp_path / "b", meta, config) == 3
