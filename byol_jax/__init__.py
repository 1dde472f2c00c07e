"""BYOL (Bootstrap Your Own Latent) in JAX and Haiku."""

__version__ = "0.1.0"
