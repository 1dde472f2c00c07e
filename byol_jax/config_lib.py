"""Named configs: lookup by name, checked command-line overrides, derived fields.

`--config=NAME[:ARG]` picks `byol_jax/configs/NAME.py` (a path to any file with a
`get_config()` works too); `--config.a.b=value` overrides a field. Both are
checked here before absl parses them, so a typo gets one readable line instead
of a traceback.
"""

import difflib
import importlib.util
import math
import pathlib
import re
from typing import List, Sequence

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
_NOT_CONFIGS = {"__init__", "base"}


class ConfigError(ValueError):
  """A user-caused configuration problem; the message says how to fix it."""


def available() -> List[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def config_path(name_or_path: str) -> str:
  """A config name or a path -> the path of its file (arguments after ':' kept)."""
  name, sep, arg = name_or_path.partition(":")
  if (CONFIG_DIR / f"{name}.py").exists() and name not in _NOT_CONFIGS:
    return str(CONFIG_DIR / f"{name}.py") + sep + arg
  if name.endswith(".py") and pathlib.Path(name).exists():
    return name_or_path
  close = difflib.get_close_matches(name, available(), n=3)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  raise ConfigError(f"Unknown config {name!r}.{hint} Available: {', '.join(available())} "
                    "(or pass the path of a .py file with get_config()).")


def load(name_or_path: str) -> ml_collections.ConfigDict:
  """Loads a config by name or path, as `--config` would."""
  path, _, arg = config_path(name_or_path).partition(":")
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _fields(config, prefix=""):
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, prefix + key + ".")


def check_override(config: ml_collections.ConfigDict, field: str) -> None:
  node = config
  for i, part in enumerate(field.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      parent = ".".join(field.split(".")[:i])
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(field, list(_fields(config)), n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      where = f"config.{parent}" if parent else "the config"
      raise ConfigError(f"Unknown config field {field!r}.{hint} Fields of {where}: "
                        f"{', '.join(known)}.")
    node = node[part]


def resolve_argv(argv: Sequence[str]) -> List[str]:
  """Rewrites `--config=NAME` to its file path and checks every `--config.X` override."""
  argv = list(argv)
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
      argv[i] = "--config=" + config_path(value)
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
      argv[i + 1] = config_path(value)
  if value is None:
    raise ConfigError(f"Missing --config. Available: {', '.join(available())}.")
  config = load(value)
  for arg in argv:
    m = re.match(r"--config\.([^=]+)(=|$)", arg)
    if m:
      check_override(config, m.group(1))
  return argv


def finalize(config: ml_collections.ConfigDict, num_train_examples: int,
             num_classes: int) -> ml_collections.ConfigDict:
  """Fills the fields derived from the dataset and checks the result."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.data.num_train_examples < 0:
    config.data.num_train_examples = num_train_examples
  if config.data.num_classes < 0:
    config.data.num_classes = num_classes
  steps_per_epoch = config.data.num_train_examples / config.batch_size
  if config.steps < 0:
    config.steps = max(1, math.ceil(config.epochs * steps_per_epoch))
  if config.warmup_steps < 0:
    config.warmup_steps = min(config.steps, round(config.warmup_epochs * steps_per_epoch))
  if config.batch_size <= 0:
    raise ConfigError(f"batch_size must be positive, got {config.batch_size}.")
  if config.warmup_steps > config.steps:
    raise ConfigError(f"warmup_steps ({config.warmup_steps}) exceeds steps ({config.steps}); "
                      "lower --config.warmup_epochs or raise --config.epochs.")
  if config.tau_schedule not in ("cosine", "constant"):
    raise ConfigError(f"tau_schedule must be 'cosine' or 'constant', got {config.tau_schedule!r}.")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                      f"{config.compute_dtype!r}.")
  return config
