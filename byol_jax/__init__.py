"""BYOL (Bootstrap Your Own Latent) in JAX and Haiku.

`byol_jax.load_encoder(path)` (`interop/jax_encoder.py`) gives a trained encoder
as a jitted function; it is imported on first use, so `import byol_jax` alone
does not import JAX.
"""

__version__ = "0.1.0"


def __getattr__(name):
  if name == "load_encoder":
    from byol_jax.interop.jax_encoder import load_encoder  # pylint: disable=g-import-not-at-top
    return load_encoder
  raise AttributeError(f"module 'byol_jax' has no attribute {name!r}")
