"""Every public name the README shows, and the console script, import as spelled."""

import importlib
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README_NAMES = sorted(set(re.findall(r"\bbyol_jax(?:\.[A-Za-z_]\w*)+",
                                     (REPO / "README.md").read_text())))


def resolve(dotted: str):
  """The object a dotted name denotes: the longest importable module, then attributes."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ModuleNotFoundError:
      continue
    for attr in parts[cut:]:
      obj = getattr(obj, attr)
    return obj
  raise ModuleNotFoundError(dotted)


def test_the_readme_names_the_public_entry_points():
  assert {"byol_jax.main", "byol_jax.torch_resnet.load_safetensors"} <= set(README_NAMES)


@pytest.mark.parametrize("name", README_NAMES)
def test_readme_name_imports(name):
  assert resolve(name) is not None


def test_console_script_target_exists():
  setup = (REPO / "setup.py").read_text()
  target = re.search(r'"byol-jax=([\w.]+):(\w+)"', setup)
  assert target, "setup.py declares the byol-jax console script"
  assert callable(getattr(importlib.import_module(target.group(1)), target.group(2)))


def test_torch_resnet_public_path_is_the_twin():
  from byol_jax import torch_resnet  # pylint: disable=g-import-not-at-top
  from byol_jax.interop import torch_resnet as twin  # pylint: disable=g-import-not-at-top
  assert torch_resnet.load_safetensors is twin.load_safetensors
  assert torch_resnet.ResNet is twin.ResNet
