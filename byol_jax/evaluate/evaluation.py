"""Representation quality: probe accuracy, kNN accuracy and the collapse monitor.

Features are computed on every device for this process's share of each batch,
then gathered to every process (`process_allgather`), so each process holds the
same full feature matrices and computes the same numbers.
"""

import functools
from typing import Callable, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from byol_jax.data import input_pipeline
from byol_jax.model import objectives
from byol_jax.train import parallel


def extract(embed_fn: Callable, params, state, batches: Iterable[dict], mesh,
            max_examples: int = -1, keys=("embedding", "logits", "projection")) -> Dict[str, np.ndarray]:
  """Runs `embed_fn` over `batches`; returns numpy features of the valid rows, in order."""
  chunks = {k: [] for k in (*keys, "label")}
  seen = 0
  for local in batches:
    batch = parallel.to_global(local, mesh)
    out = embed_fn(params, state, batch["image"])
    out = {k: out[k] for k in keys}
    out["label"], out["mask"] = batch["label"], batch["mask"]
    out = multihost_utils.process_allgather(out, tiled=True)
    mask = np.asarray(out["mask"], bool)
    for k in chunks:
      chunks[k].append(np.asarray(out[k])[mask])
    seen += int(mask.sum())
    if 0 < max_examples <= seen:
      break
  result = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}
  if max_examples > 0:
    result = {k: v[:max_examples] for k, v in result.items()}
  return result


@functools.partial(jax.jit, static_argnames="k")
def _knn_votes(test, train, train_onehot, temperature, k):
  sims = objectives.l2_normalize(test) @ objectives.l2_normalize(train).T
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  return jnp.einsum("tk,tkc->tc", weights, train_onehot[top_idx])


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> Dict[str, float]:
  """Weighted kNN (cosine similarity, weights exp(sim / T)): top-1 and top-5 accuracy."""
  k = min(k, len(train_features))
  onehot = jax.nn.one_hot(train_labels, num_classes)
  train = jnp.asarray(train_features, jnp.float32)
  hits = {"top1": 0, "top5": 0}
  for start in range(0, len(test_features), chunk):
    votes = _knn_votes(jnp.asarray(test_features[start:start + chunk], jnp.float32), train,
                       onehot, temperature, k)
    counts = objectives.topk_correct(votes, jnp.asarray(test_labels[start:start + chunk]))
    for key in hits:
      hits[key] += int(counts[key])
  n = max(len(test_features), 1)
  return {key: value / n for key, value in hits.items()}


def probe_accuracy(logits, labels) -> Dict[str, float]:
  counts = objectives.topk_correct(jnp.asarray(logits), jnp.asarray(labels))
  n = max(int(np.sum(np.asarray(labels) >= 0)), 1)
  return {k: int(v) / n for k, v in counts.items()}


def projection_spread(projections) -> float:
  """Mean per-dimension std of l2-normalised projections, x sqrt(d).

  Spread-out unit vectors in d dimensions have per-dimension std ~1/sqrt(d),
  so this is ~1 for a healthy representation and falls to 0 under collapse.
  """
  z = np.asarray(objectives.l2_normalize(jnp.asarray(projections, jnp.float32)))
  return float(np.mean(np.std(z, axis=0)) * np.sqrt(z.shape[-1]))


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
             knn_temperature: float, max_examples: int = -1) -> Dict[str, float]:
  """Probe top-1/5 and collapse monitor on the test batches; kNN when train batches are given."""
  test = extract(embed_fn, params, state, test_batches, mesh, max_examples)
  metrics = {"eval/projection_std": projection_spread(test["projection"])}
  labelled = test["label"] >= 0
  if labelled.any():
    probe = probe_accuracy(test["logits"][labelled], test["label"][labelled])
    metrics.update({f"eval/probe_{k}": v for k, v in probe.items()})
    if train_batches is not None:
      train = extract(embed_fn, params, state, train_batches, mesh, max_examples,
                      keys=("embedding",))
      keep = train["label"] >= 0
      if keep.any():
        knn = knn_accuracy(train["embedding"][keep], train["label"][keep],
                           test["embedding"][labelled], test["label"][labelled],
                           num_classes=num_classes, k=knn_k, temperature=knn_temperature)
        metrics.update({f"eval/knn_{k}": v for k, v in knn.items()})
  return metrics


def evaluate_on_splits(config, embed_fn, params, state, mesh, *, max_examples: int = -1):
  """`evaluate` on the config's test split, with kNN over its training split."""
  def batches(split):
    return input_pipeline.eval_batches(
        config, split, batch_size=config.eval.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count())

  return evaluate(embed_fn, params, state, train_batches=batches(config.data.train_split),
                  test_batches=batches(config.data.test_split), mesh=mesh,
                  num_classes=config.data.num_classes, knn_k=config.eval.knn_k,
                  knn_temperature=config.eval.knn_temperature, max_examples=max_examples)
