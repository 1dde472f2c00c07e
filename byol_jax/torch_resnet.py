"""`byol_jax.torch_resnet`, the public path of the PyTorch twin (`interop/torch_resnet.py`).

Exports and the README name `byol_jax.torch_resnet.load_safetensors`; this keeps
that spelling importable. Like the twin, it imports torch and never JAX.
"""

from byol_jax.interop.torch_resnet import ResNet, load_safetensors, projector, resnet

__all__ = ["ResNet", "load_safetensors", "projector", "resnet"]
