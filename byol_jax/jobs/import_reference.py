"""The import_reference job: a DeepMind BYOL checkpoint (.pkl) -> a byol_jax checkpoint.

`--config.import_path` names a file DeepMind released with deepmind-research/byol
(e.g. pretrain_res50x1.pkl). Its online network lands in <workdir>/checkpoints,
where `linear_eval`, `knn` and `export` read it as they read a pretraining run.
"""

import os

from byol_jax.errors import ConfigError
from byol_jax.interop import reference_checkpoint
from byol_jax.train import checkpoint


def run(config, workdir: str, mesh) -> dict:
  del mesh  # the arrays stay on the host; every process saves the same ones
  if not config.import_path:
    raise ConfigError("Missing --config.import_path: the released checkpoint to import, e.g. "
                      "--config.import_path=pretrain_res50x1.pkl (see the README).")
  imported = reference_checkpoint.import_file(config.import_path, config.model)
  config = config.copy_and_resolve_references()
  if imported.num_classes:  # the reference's online classifier becomes the probe
    if config.data.num_classes > 0 and config.data.num_classes != imported.num_classes:
      raise ConfigError(f"The checkpoint's online classifier has {imported.num_classes} classes "
                        f"but data.num_classes is {config.data.num_classes}: drop "
                        "--config.data.num_classes (or set it to "
                        f"{imported.num_classes}).")
    config.data.num_classes = imported.num_classes
  checkpoint.save_online(workdir, imported.step, imported.params, imported.state, config)
  path = os.path.join(checkpoint.checkpoint_dir(workdir), str(imported.step))
  print(f"[import_reference] step={imported.step} checkpoint={path}", flush=True)
  return {"step": imported.step, "checkpoint": path}
