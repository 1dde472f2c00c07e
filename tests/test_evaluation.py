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
