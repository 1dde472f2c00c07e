"""Imports DeepMind's reference BYOL (deepmind-research/byol) from a local checkout.

The reference is not part of byol_jax and is not copied here: the scripts that
run it take --reference_dir, a checkout of that repository (the folder that
holds byol/). Its code runs unchanged on the current jax after shims that touch
none of its maths:

* `jax.tree_map` and `jax.tree_multimap` (its LARS), removed from jax, are set to
  `jax.tree.map`, which maps over several trees as tree_multimap did;
* `acme.jax.utils` (imported for the input pipeline's prefetch) and `dill` (for
  its checkpoints), neither used by these scripts, are empty modules when not
  installed.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types


def _empty_module(dotted: str) -> None:
  """Registers `dotted` and its parents as empty modules."""
  parent = None
  parts = dotted.split(".")
  for i in range(len(parts)):
    name = ".".join(parts[:i + 1])
    module = sys.modules.setdefault(name, types.ModuleType(name))
    if parent is not None:
      setattr(parent, parts[i], module)
    parent = module


def import_reference(reference_dir: str, *modules: str):
  """The reference's modules `modules` (below byol/, e.g. "configs.byol"), with the shims."""
  import jax  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(reference_dir, "byol", "byol_experiment.py")):
    raise SystemExit(f"--reference_dir={reference_dir} has no byol/byol_experiment.py: give the "
                     "deepmind-research checkout, the folder that holds byol/.")
  for name in ("tree_map", "tree_multimap"):
    if not hasattr(jax, name):
      setattr(jax, name, jax.tree.map)
  for name in ("acme.jax.utils", "dill"):
    try:
      importlib.import_module(name)
    except ImportError:
      _empty_module(name)
  sys.path.insert(0, os.path.abspath(reference_dir))
  return tuple(importlib.import_module(f"byol.{m}") for m in modules)


def build(experiment_class, config: dict):
  """`experiment_class(**config)` (ByolExperiment, EvalExperiment); its Checkpointer makes
  a folder, which is removed: nothing is written there."""
  checkpoint_dir = tempfile.mkdtemp(prefix="byol_ref_")
  config["checkpointing_config"]["checkpoint_dir"] = checkpoint_dir
  try:
    return experiment_class(**config)
  finally:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def revision(reference_dir: str) -> str:
  """The checkout's git commit, or "unknown" outside git."""
  try:
    return subprocess.run(["git", "-C", reference_dir, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
