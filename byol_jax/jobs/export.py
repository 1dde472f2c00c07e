"""The export job: the pretrained encoder as .npz and torchvision safetensors under workdir/export."""

import os

import jax

from byol_jax.interop import export
from byol_jax.train import checkpoint, parallel


def run(config, workdir: str, mesh) -> dict:
  source = config.linear_eval.pretrained_workdir or workdir
  config, _, params, state = checkpoint.load_pretrained(config, source, mesh)
  params, state = parallel.fetch((params, state))
  if jax.process_index() != 0:
    return {}
  paths = export.run_export(params, state, config, os.path.join(workdir, "export"))
  print("[export] " + " ".join(f"{k}={v}" for k, v in paths.items()), flush=True)
  return paths
