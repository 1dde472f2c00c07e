"""The errors a user can cause; each message says what is wrong and how to fix it.

`main` prints these as one line (no traceback unless --traceback) and exits
non-zero; anything else is a bug in byol_jax (or a library under it) and keeps
its traceback. So raise these for a user's mistake, never a bare ValueError.
"""


class ConfigError(ValueError):
  """A configuration problem."""


class DataSourceError(ValueError):
  """A data source cannot be read as configured; the message says how to fix it."""


class MissingDependencyError(ImportError):
  """A package that what was asked needs is not installed; the message says which."""


class StorageError(OSError):
  """Remote storage failed (e.g. the network, mid-write); what was written before is intact."""


class NonFiniteLossError(RuntimeError):
  """Training diverged: the loss became NaN or infinite."""
