"""BYOL's regression loss and the probe's cross-entropy."""

import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
  # The eps guards zero vectors; it is added to the squared norm as in the reference.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def regression_loss(prediction, target):
  """Per-example 2 - 2 cos(prediction, target). Gradients never reach `target`."""
  target = jax.lax.stop_gradient(target)
  cos = jnp.sum(l2_normalize(prediction) * l2_normalize(target), axis=-1)
  return 2.0 - 2.0 * cos


def byol_loss(online_1, online_2, target_1, target_2):
  """Symmetrised loss, batch mean: online(view1) predicts target(view2) and vice versa."""
  return jnp.mean(regression_loss(online_1, target_2) + regression_loss(online_2, target_1))


def softmax_cross_entropy(logits, labels):
  """Mean cross-entropy and top-1 / top-5 hit counts; labels < 0 are ignored."""
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  nll = -jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
  count = jnp.maximum(jnp.sum(valid), 1)
  loss = jnp.sum(jnp.where(valid, nll, 0.0)) / count
  return loss, topk_correct(logits, labels)


def topk_correct(logits, labels, ks=(1, 5)):
  """Number of examples whose label is among the top-k logits (labels < 0 skipped)."""
  # rank = how many classes score strictly higher than the true one.
  true_logit = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=-1)
  rank = jnp.sum(logits > true_logit, axis=-1)
  valid = labels >= 0
  return {f"top{k}": jnp.sum((rank < k) & valid) for k in ks}
