"""BYOL's regression loss and the linear probe's cross-entropy / top-k counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.model import objectives


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


PRED = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [3.0, 0.0, -4.0]], np.float32)
TARG = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 2.0, 0.5]], np.float32)


def test_regression_loss_is_two_minus_two_cosine():
  """On hand-made vectors the loss equals 2 - 2 cos, cos computed by hand in NumPy."""
  expected = 2.0 - 2.0 * _cos(PRED, TARG)
  # Sanity of the hand example: the cosines are spread out, not all ~0 or ~1.
  assert np.ptp(expected) > 0.5
  np.testing.assert_allclose(objectives.regression_loss(PRED, TARG), expected, rtol=1e-6, atol=1e-6)
  # By hand for the first row: <(1,2,3),(2,0,1)> = 5, norms sqrt(14) and sqrt(5).
  np.testing.assert_allclose(objectives.regression_loss(PRED[:1], TARG[:1])[0],
                             2.0 - 2.0 * 5.0 / np.sqrt(14.0 * 5.0), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.01, 3.7, 250.0])
def test_regression_loss_extremes(scale):
  """Loss ~0 when target is a positive multiple of the prediction, ~4 when opposite."""
  np.testing.assert_allclose(objectives.regression_loss(PRED, scale * PRED), 0.0, atol=1e-6)
  np.testing.assert_allclose(objectives.regression_loss(PRED, -scale * PRED), 4.0, rtol=1e-6)
  # Scaling the prediction instead of the target changes nothing either.
  np.testing.assert_allclose(objectives.regression_loss(scale * PRED, TARG),
                             objectives.regression_loss(PRED, TARG), rtol=1e-5)


def test_byol_loss_is_symmetrised_and_crossed():
  """byol_loss = mean(l(online_1, target_2) + l(online_2, target_1)), the views crossed."""
  rng = np.random.default_rng(0)
  o1, o2, t1, t2 = (rng.normal(size=(5, 8)).astype(np.float32) for _ in range(4))
  by_hand = np.mean((2 - 2 * _cos(o1, t2)) + (2 - 2 * _cos(o2, t1)))
  got = objectives.byol_loss(o1, o2, t1, t2)
  np.testing.assert_allclose(got, by_hand, rtol=1e-5)
  np.testing.assert_allclose(
      got, jnp.mean(objectives.regression_loss(o1, t2) + objectives.regression_loss(o2, t1)),
      rtol=1e-6)
  # Pairing each view with its own target would give a different number.
  uncrossed = np.mean((2 - 2 * _cos(o1, t1)) + (2 - 2 * _cos(o2, t2)))
  assert abs(float(got) - uncrossed) > 1e-2


def test_no_gradient_reaches_the_target():
  """jax.grad w.r.t. the target argument is exactly zero; w.r.t. the prediction it is not."""
  g_target = jax.grad(lambda t: jnp.sum(objectives.regression_loss(PRED, t)))(TARG)
  assert np.all(np.asarray(g_target) == 0.0)
  g_pred = jax.grad(lambda p: jnp.sum(objectives.regression_loss(p, TARG)))(PRED)
  assert np.all(np.abs(np.asarray(g_pred)).sum(-1) > 1e-3)

  rng = np.random.default_rng(1)
  o1, o2, t1, t2 = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(4))
  gt1, gt2 = jax.grad(objectives.byol_loss, argnums=(2, 3))(o1, o2, t1, t2)
  assert np.all(np.asarray(gt1) == 0.0) and np.all(np.asarray(gt2) == 0.0)
  go1, go2 = jax.grad(objectives.byol_loss, argnums=(0, 1))(o1, o2, t1, t2)
  assert np.abs(np.asarray(go1)).sum() > 1e-3 and np.abs(np.asarray(go2)).sum() > 1e-3


def test_l2_normalize_handles_zero_vectors():
  """A zero vector normalises to zero (no NaN); others get unit norm."""
  x = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], np.float32)
  y = np.asarray(objectives.l2_normalize(x))
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y, [[0, 0, 0], [0.6, 0.8, 0.0]], atol=1e-7)


LOGITS = np.array([
    [5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 0: rank 0 -> top1 and top5
    [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],  # label 4: rank 4 -> top5 only
    [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],  # label 5: rank 5 -> neither
    [0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0],   # label -1: ignored (would be a top-1 hit for 2)
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],   # label 6: top1
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],   # label 1: rank 5 -> neither
], np.float32)
LABELS = np.array([0, 4, 5, -1, 6, 1], np.int32)


def test_topk_counts_on_a_hand_example():
  """top1 / top5 hit counts on a hand example, the unlabelled row skipped."""
  hits = objectives.topk_correct(LOGITS, LABELS)
  assert int(hits["top1"]) == 2
  assert int(hits["top5"]) == 3
  _, hits2 = objectives.softmax_cross_entropy(LOGITS, LABELS)
  assert int(hits2["top1"]) == 2 and int(hits2["top5"]) == 3
  # The row with label -1 would be a top-1 hit for class 2; it must not count.
  labels = LABELS.copy()
  labels[3] = 2
  assert int(objectives.topk_correct(LOGITS, labels)["top1"]) == 3


def test_cross_entropy_ignores_negative_labels():
  """Mean cross-entropy is over rows with labels >= 0 only; ignored rows cannot move it."""
  log_probs = LOGITS - np.log(np.sum(np.exp(LOGITS.astype(np.float64)), -1, keepdims=True))
  valid = LABELS >= 0
  expected = -np.mean(log_probs[valid, LABELS[valid]])
  loss, _ = objectives.softmax_cross_entropy(LOGITS, LABELS)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)

  changed = LOGITS.copy()
  changed[3] = np.array([-50.0, 30.0, 0.0, 7.0, 1.0, 2.0, 3.0])
  np.testing.assert_allclose(objectives.softmax_cross_entropy(changed, LABELS)[0], loss, rtol=1e-6)

  # Gradient into the ignored row is exactly zero.
  g = jax.grad(lambda z: objectives.softmax_cross_entropy(z, LABELS)[0])(LOGITS)
  assert np.all(np.asarray(g)[3] == 0.0) and np.abs(np.asarray(g)[0]).sum() > 0

  # Nothing labelled: loss 0 (not NaN) and no hits.
  none = -np.ones_like(LABELS)
  loss0, hits0 = objectives.softmax_cross_entropy(LOGITS, none)
  assert float(loss0) == 0.0 and int(hits0["top1"]) == 0 and int(hits0["top5"]) == 0
