"""The errors a user can cause; each message says what is wrong and how to fix it.

`main` prints these as one line (no traceback unless --traceback) and exits
non-zero; anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A configuration problem."""


class NonFiniteLossError(RuntimeError):
  """Training diverged: the loss became NaN or infinite."""
