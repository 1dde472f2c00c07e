"""Named configs: lookup by name, checked command-line overrides, derived fields.

`--config=NAME[:ARG]` picks `byol_jax/configs/NAME.py` (a path to any file with a
`get_config()` works too); `--config.a.b=value` overrides a field. Both are
checked here before absl parses them, so a typo gets one readable line instead
of a traceback. The config file is executed once, here.
"""

import ast
import difflib
import importlib.util
import math
import pathlib
import re
import sys
from typing import List, Sequence, Tuple

import ml_collections

from byol_jax.data import datasets
from byol_jax.errors import ConfigError
from byol_jax.train import parallel

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
_NOT_CONFIGS = {"__init__", "base"}


def available() -> List[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def describe(name: str) -> str:
  """The first line of a named config's docstring (read, not executed)."""
  doc = ast.get_docstring(ast.parse((CONFIG_DIR / f"{name}.py").read_text())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


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


def load_from_argv(argv: Sequence[str]) -> Tuple[ml_collections.ConfigDict, List[str]]:
  """Loads the config that `--config=NAME` names and checks every `--config.X` override.

  Returns the config and argv without the `--config` argument itself, for absl
  to apply the overrides to it (`config_flags.DEFINE_config_dict`).
  """
  argv, rest, value = list(argv), [], None
  i = 0
  while i < len(argv):
    if argv[i].startswith("--config="):
      value = argv[i].split("=", 1)[1]
    elif argv[i] == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
      i += 1
    else:
      rest.append(argv[i])
    i += 1
  if value is None:
    raise ConfigError(f"Missing --config. Available: {', '.join(available())} "
                      "(--help describes each).")
  config = load(value)
  for arg in rest:
    m = re.match(r"--config\.([^=]+)(=|$)", arg)
    if m:
      check_override(config, m.group(1))
  return config, rest


def exit_on_bad_command_line(name_or_path: str, overrides: Sequence[str]) -> None:
  """For launchers: a misspelt config or field ends the launch here, in one line."""
  try:
    load_from_argv(["byol_jax.main", f"--config={name_or_path}", *overrides])
  except ConfigError as e:
    sys.exit(f"error: {e}")


def prepare(config: ml_collections.ConfigDict, mesh) -> ml_collections.ConfigDict:
  """Dataset sizes -> finalised config (derived steps, classes) checked against the mesh."""
  num_examples, num_classes = datasets.dataset_info(config, config.data.train_split)
  config = finalize(config, num_examples, num_classes)
  parallel.check_batch_size(config.batch_size, mesh)
  return config


def finalize(config: ml_collections.ConfigDict, num_train_examples: int,
             num_classes: int) -> ml_collections.ConfigDict:
  """Fills the fields derived from the dataset, checks the result and locks it.

  Steps count whole batches as the reference does: floor(epochs * N / batch).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  _check_positive(config, "batch_size", "checkpoint.keep")
  if config.checkpoint.every_steps < 0:
    raise ConfigError(f"checkpoint.every_steps must be >= 0 (0: only at the end), got "
                      f"{config.checkpoint.every_steps}; without checkpoints a run's result is "
                      "lost. Set --config.checkpoint.every_steps=1000, say.")
  if config.data.num_train_examples < 0:
    config.data.num_train_examples = num_train_examples
  if config.data.num_classes < 0:
    config.data.num_classes = num_classes
  if config.data.num_train_examples <= 0:
    raise ConfigError(f"The training split {config.data.train_split!r} has no examples; check "
                      "--config.data.train_split and the data source.")
  steps_per_epoch = config.data.num_train_examples / config.batch_size
  if config.steps < 0 and config.epochs <= 0:
    raise ConfigError(f"epochs must be positive, got {config.epochs}; set --config.epochs (or "
                      "--config.steps) to a positive value.")
  if config.steps < 0:
    config.steps = max(1, math.floor(config.epochs * steps_per_epoch))
  if config.warmup_steps < 0:
    config.warmup_steps = min(config.steps, math.floor(config.warmup_epochs * steps_per_epoch))
  if config.steps == 0:
    raise ConfigError("steps is 0, so there is nothing to train; set --config.steps or "
                      "--config.epochs to a positive value.")
  if config.warmup_steps > config.steps:
    raise ConfigError(f"warmup_steps ({config.warmup_steps}) exceeds steps ({config.steps}); "
                      "lower --config.warmup_epochs or raise --config.epochs.")
  _check_profile_steps(config)
  _check_choice(config, "tau_schedule", ("cosine", "constant"))
  if config.compute_dtype == "float64":
    raise ConfigError("compute_dtype 'float64' is a parity-check path (jax_enable_x64, "
                      "benchmarks/reference_parity.py --dtype=float64), not a training option: "
                      "use 'float32' or 'bfloat16'.")
  _check_choice(config, "compute_dtype", ("float32", "bfloat16"))
  config.lock()
  return config


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def _check_positive(config, *fields: str) -> None:
  for field in fields:
    if _get(config, field) <= 0:
      raise ConfigError(f"{field} must be positive, got {_get(config, field)}; set "
                        f"--config.{field} to a value >= 1.")


def _check_profile_steps(config) -> None:
  steps = tuple(config.profile_steps)
  if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps)
                    and 1 <= steps[0] <= steps[1] <= config.steps):
    raise ConfigError(f"profile_steps must be two steps A,B with 1 <= A <= B <= steps "
                      f"({config.steps}), got {config.profile_steps!r}; e.g. "
                      "--config.profile_steps=10,12.")


def _check_choice(config, field: str, choices: Sequence[str]) -> None:
  if _get(config, field) not in choices:
    raise ConfigError(f"{field} must be one of {', '.join(map(repr, choices))}, got "
                      f"{_get(config, field)!r}.")
