"""Representation quality: probe accuracy, kNN accuracy and the collapse monitor.

Features stay sharded over the mesh where they were computed
(`features.extract`); every readout here is a jitted reduction over them, or
the sharded kNN (`knn`), so a process holds O(N / processes) of any split.
"""

import functools
from typing import Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from byol_jax.data import input_pipeline
from byol_jax.evaluate import features as features_lib
from byol_jax.evaluate import knn
from byol_jax.model import objectives


def probe_accuracy(logits, labels, mask=None) -> Dict[str, float]:
  """Top-1 / top-5 of the online probe's logits over the rows with a label (and `mask`)."""
  counts, valid = _probe_counts(jnp.asarray(logits), jnp.asarray(labels),
                                jnp.ones(len(labels), bool) if mask is None else mask)
  return {k: int(v) / max(int(valid), 1) for k, v in counts.items()}


@jax.jit
def _probe_counts(logits, labels, mask):
  labels = jnp.where(mask, labels, -1)
  return objectives.topk_correct(logits, labels), jnp.sum(labels >= 0)


def projection_spread(projections, mask=None) -> float:
  """Mean per-dimension std of l2-normalised projections, x sqrt(d), over the rows in
  `mask` (all when None).

  Spread-out unit vectors in d dimensions have per-dimension std ~1/sqrt(d),
  so this is ~1 for a healthy representation and falls to 0 under collapse.
  """
  projections = jnp.asarray(projections, jnp.float32)
  mask = jnp.ones(projections.shape[0], bool) if mask is None else mask
  return float(_spread(projections, mask))


@jax.jit
def _spread(projections, mask):
  z = objectives.l2_normalize(projections)
  _, std = masked_moments(z, mask)
  return jnp.mean(std) * jnp.sqrt(jnp.float32(z.shape[-1]))


def masked_moments(x, mask):
  """Per-column mean and (population) std of the rows of `x` in `mask`."""
  w = mask[:, None].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(x * w, axis=0) / n
  return mean, jnp.sqrt(jnp.sum(jnp.square(x - mean) * w, axis=0) / n)


# The monitor has fallen once the spread is below this fraction of its best so far.
SPREAD_FALL = 0.8
SPREAD_KEYS = {"projection_std": "the training batches' projection spread",
               "eval/projection_std": "the test projections' spread"}


class CollapseWatch:
  """Says once, in one line, when the collapse monitor falls during a run.

  Call it with each step's reported metrics. For each spread it knows
  (`SPREAD_KEYS`: the training batches', logged every few steps, and the
  evaluation's) it keeps the run's best value; once a value falls below
  `fall` x that best, it logs a warning with the step, the spread and `remedy`,
  and returns that line (once per spread).
  """

  def __init__(self, remedy: str, fall: float = SPREAD_FALL):
    self.remedy, self.fall = remedy, fall
    self.best, self.warned = {}, set()

  def __call__(self, step: int, metrics: Dict[str, float]) -> Optional[str]:
    line = None
    for key, what in SPREAD_KEYS.items():
      if key not in metrics or key in self.warned:
        continue
      value = float(metrics[key])
      best, best_step = self.best.get(key, (-np.inf, 0))
      if value > best:
        self.best[key] = (value, step)
      elif value < self.fall * best:
        self.warned.add(key)
        line = (f"collapse monitor: at step {step} {what} fell to {value:.2f}, from {best:.2f} "
                f"at step {best_step}: the projections are losing dimensions (a partial "
                f"collapse). {self.remedy}")
        logging.warning("%s", line)
    return line


def evaluate(embed_fn, params, state, *, train_batches: Optional[Iterable[dict]],
             test_batches: Iterable[dict], mesh, num_classes: int, knn_k: int,
             knn_temperature: float, knn_bank_dtype: str = "float32") -> Dict[str, float]:
  """Probe top-1/5 and collapse monitor on the test batches; kNN when train batches are
  given. The metrics say how many examples each read (`eval/test_examples`,
  `eval/knn_train_examples`)."""
  test = features_lib.extract(embed_fn, params, state, test_batches, mesh)
  metrics = {"eval/projection_std": projection_spread(test["projection"], test["mask"]),
             "eval/test_examples": test.count}
  labelled = bool(int(jnp.sum(features_lib.valid(test))))
  if labelled:
    probe = probe_accuracy(test["logits"], test["label"], test["mask"])
    metrics.update({f"eval/probe_{k}": v for k, v in probe.items()})
  if labelled and train_batches is not None:
    train = features_lib.extract(embed_fn, params, state, train_batches, mesh,
                                 keys=("embedding",))
    metrics["eval/knn_train_examples"] = train.count
    if int(jnp.sum(features_lib.valid(train))):
      result = knn.knn_accuracy(train, test, mesh, num_classes=num_classes, k=knn_k,
                                temperature=knn_temperature, bank_dtype=knn_bank_dtype)
      metrics.update({f"eval/knn_{k}": v for k, v in result.items()})
  return metrics


def evaluate_on_splits(config, embed_fn, params, state, mesh, *, train_split: str):
  """`evaluate` on the config's test split, with kNN over `train_split` (periodic
  evaluation: `eval.knn_train_split`; `--job=knn`: all of `data.train_split`)."""
  batches = functools.partial(input_pipeline.eval_batches, config,
                              batch_size=config.eval.batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  return evaluate(embed_fn, params, state, train_batches=batches(train_split),
                  test_batches=batches(config.data.test_split), mesh=mesh,
                  num_classes=config.data.num_classes, knn_k=config.eval.knn_k,
                  knn_temperature=config.eval.knn_temperature,
                  knn_bank_dtype=config.eval.knn_bank_dtype)


def periodic_train_split(config) -> str:
  """The kNN bank of periodic evaluation: `eval.knn_train_split`, else `data.train_split`."""
  return config.eval.knn_train_split or config.data.train_split
