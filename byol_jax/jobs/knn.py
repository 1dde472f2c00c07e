"""The kNN job: kNN (and probe) accuracy of a pretrained encoder, written to knn_results.json.

The bank is all of `data.train_split` (periodic evaluation may read a subset:
`eval.knn_train_split`), sharded over every device (`evaluate.knn`).
"""

import json
import os

import jax

from byol_jax import fileio
from byol_jax.evaluate import evaluation
from byol_jax.train import checkpoint, train_step


def run(config, workdir: str, mesh) -> dict:
  source = config.linear_eval.pretrained_workdir or workdir
  config, nets, params, state = checkpoint.load_pretrained(config, source, mesh)
  embed = train_step.make_embed_fn(nets, mesh)
  metrics = evaluation.evaluate_on_splits(config, embed, params, state, mesh,
                                          train_split=config.data.train_split)
  print("[knn] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
  if jax.process_index() == 0:
    fileio.write_text(os.path.join(workdir, "knn_results.json"), json.dumps(metrics, indent=2))
  return metrics
