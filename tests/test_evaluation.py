"""kNN, probe accuracy and the collapse monitor on hand-made features."""

import numpy as np

from byol_jax.evaluate import evaluation


def test_knn_on_separable_clusters_and_on_noise():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 5
  train_labels = np.repeat(np.arange(4), 50)
  train = centres[train_labels] + rng.normal(size=(200, 16))
  test_labels = np.repeat(np.arange(4), 10)
  test = centres[test_labels] + rng.normal(size=(40, 16))
  good = evaluation.knn_accuracy(train, train_labels, test, test_labels, num_classes=4, k=20)
  assert good["top1"] == 1.0
  shuffled = evaluation.knn_accuracy(train, rng.permutation(train_labels), test, test_labels,
                                     num_classes=4, k=20, chunk=7)
  assert shuffled["top1"] < 0.6


def test_knn_weights_favour_closer_neighbours():
  """With k=3: one very close neighbour of class 1 outvotes two distant ones of class 0."""
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
  labels = np.array([1, 0, 0])
  test = np.array([[1.0, 0.05]])
  acc = evaluation.knn_accuracy(train, labels, test, np.array([1]), num_classes=2, k=3,
                                temperature=0.1)
  assert acc["top1"] == 1.0
  flat = evaluation.knn_accuracy(train, labels, test, np.array([1]), num_classes=2, k=3,
                                 temperature=100.0)
  assert flat["top1"] == 0.0  # near-uniform weights: the majority wins


def test_probe_accuracy_top1_top5():
  logits = np.eye(6)[[0, 1, 2, 3]] + 0.01 * np.arange(6)
  labels = np.array([0, 2, 5, -1])
  acc = evaluation.probe_accuracy(logits, labels)
  assert acc["top1"] == 1 / 3
  assert acc["top5"] == 1.0


def test_projection_spread_detects_collapse():
  rng = np.random.default_rng(1)
  spread = evaluation.projection_spread(rng.normal(size=(512, 64)))
  collapsed = evaluation.projection_spread(np.ones((512, 64)) + 1e-4 * rng.normal(size=(512, 64)))
  assert 0.9 < spread < 1.1
  assert collapsed < 0.01


def _watch(rows, **kwargs):
  watch = evaluation.CollapseWatch("REMEDY.", **kwargs)
  return [line for step, metrics in rows if (line := watch(step, metrics))]


def test_collapse_watch_is_quiet_while_the_spread_holds():
  # Seed 0 of the lower-lr demo recipe: a rise, then wobbles within 20% of its best.
  spreads = [0.66, 0.67, 0.69, 0.71, 0.73, 0.72, 0.73, 0.70, 0.71, 0.62]
  assert _watch([(100 * (i + 1), {"projection_std": s}) for i, s in enumerate(spreads)]) == []


def test_collapse_watch_says_once_where_the_spread_fell_and_what_to_do(caplog):
  # Seed 0 of the recipe: best 0.71 at step 300, 0.54 at step 1200.
  spreads = {100: 0.66, 200: 0.58, 300: 0.71, 600: 0.65, 1200: 0.54, 1300: 0.57, 2000: 0.50}
  rows = [(step, {"projection_std": s, "loss": 1.0}) for step, s in spreads.items()]
  rows.insert(3, (500, {"eval/projection_std": 0.6}))
  lines = _watch(rows + [(2000, {"eval/projection_std": 0.45})])
  assert lines == [
      "collapse monitor: at step 1200 the training batches' projection spread fell to 0.54, "
      "from 0.71 at step 300: the projections are losing dimensions (a partial collapse). "
      "REMEDY.",
      "collapse monitor: at step 2000 the test projections' spread fell to 0.45, from 0.60 at "
      "step 500: the projections are losing dimensions (a partial collapse). REMEDY."]
  assert lines[0] in caplog.text
  assert _watch(rows, fall=0.7) == []  # 0.54 is above 0.7 x 0.71
