"""Weights in and out of byol_jax.

`export` (.npz and torchvision files), `torchvision_export` (the renaming to
torchvision's layout), `torch_resnet` (the PyTorch twin that loads it; torch
only, never JAX), `reference_checkpoint` (DeepMind's BYOL state <-> byol_jax's
TrainState) and `reference_pickle` (its released .pkl files, read without
running pickled code). May import `train`, `model` and the shared utilities.
"""
