"""Weights in and out of byol_jax.

`export` (.npz and torchvision files), `torchvision_export` (the renaming to
torchvision's layout), `torch_resnet` (the PyTorch twin that loads it; torch
only, never JAX) and `reference_checkpoint` (DeepMind's released .pkl files,
read without running pickled code). May import `model` and the shared
utilities.
"""
