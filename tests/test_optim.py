"""Learning-rate and EMA schedules, and LARS against a NumPy re-implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from byol_jax.model import networks
from byol_jax.train import optim
from tests import tiny

# Schedule constants: peak = 0.4 * 512 / 256 = 0.8.
BASE_LR, BATCH, WARMUP, TOTAL = 0.4, 512, 10, 110
PEAK = BASE_LR * BATCH / 256


def _lr(step):
  return float(optim.learning_rate(step, base_lr=BASE_LR, batch_size=BATCH,
                                   warmup_steps=WARMUP, total_steps=TOTAL))


def test_learning_rate_warmup_is_linear_from_zero():
  """Warm-up: 0 at step 0, half the peak half-way, linear in between, peak = base_lr*batch/256."""
  assert _lr(0) == 0.0
  np.testing.assert_allclose(_lr(WARMUP // 2), PEAK / 2, rtol=1e-6)
  for s in range(WARMUP):
    np.testing.assert_allclose(_lr(s), PEAK * s / WARMUP, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_lr(WARMUP), PEAK, rtol=1e-6)
  np.testing.assert_allclose(PEAK, 0.8)


def test_learning_rate_cosine_decay():
  """Decay: peak/2 half-way through the decay, ~0 at the last step, 0 at total_steps."""
  np.testing.assert_allclose(_lr((WARMUP + TOTAL) // 2), PEAK / 2, rtol=1e-5)
  quarter = WARMUP + (TOTAL - WARMUP) // 4
  np.testing.assert_allclose(_lr(quarter), PEAK * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-5)
  assert 0.0 < _lr(TOTAL - 1) < 1e-3 * PEAK
  assert abs(_lr(TOTAL)) < 1e-7
  lrs = [_lr(s) for s in range(WARMUP, TOTAL + 1)]
  assert all(a >= b for a, b in zip(lrs, lrs[1:])), "decay must be monotone"


def test_learning_rate_is_jittable_on_traced_steps():
  """The schedule works on traced integer steps (as optax calls it inside jit)."""
  f = jax.jit(lambda s: optim.learning_rate(s, base_lr=BASE_LR, batch_size=BATCH,
                                            warmup_steps=WARMUP, total_steps=TOTAL))
  np.testing.assert_allclose(f(jnp.int32(WARMUP)), PEAK, rtol=1e-6)


@pytest.mark.parametrize("base_tau", [0.996, 0.99])
def test_target_decay_schedule(base_tau):
  """tau = tau_base at step 0, (1 + tau_base)/2 half-way, 1 at K (and stays 1 after)."""
  k = 1000
  tau = lambda s: float(optim.target_decay(s, base_tau=base_tau, total_steps=k))
  np.testing.assert_allclose(tau(0), base_tau, rtol=1e-7)
  np.testing.assert_allclose(tau(k // 2), (1 + base_tau) / 2, rtol=1e-7)
  np.testing.assert_allclose(tau(k), 1.0, rtol=1e-7)
  np.testing.assert_allclose(tau(2 * k), 1.0, rtol=1e-7)
  assert tau(0) < tau(k // 4) < tau(k // 2) < tau(3 * k // 4) < 1.0


# --- LARS -------------------------------------------------------------------

def _params():
  """Haiku-style names: conv 'w' (adapted), linear w and b, BN and GN scale/offset, a zero w."""
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "encoder/conv1": {"w": f(3, 3, 2, 4)},
      "encoder/bn1/bn": {"scale": 1.0 + 0.1 * f(1, 1, 1, 4), "offset": 0.1 * f(1, 1, 1, 4)},
      "encoder/layer1_0/downsample_norm/gn": {"scale": 1.0 + 0.1 * f(4), "offset": f(4)},
      "projector/linear1": {"w": f(4, 5), "b": f(5)},
      # All-zero weight: ||w|| = 0, so the trust ratio must fall back to 1.
      "projector/linear2": {"w": jnp.zeros((5, 3), jnp.float32), "b": jnp.zeros((3,))},
  }


def _grads(step, params):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


LRS = np.array([0.1, 0.7, 0.3, 1.5, 0.05, 0.9], np.float32)   # a different rate every step
WD, MOMENTUM, ETA = 0.05, 0.8, 0.02


def _reference_lars(params, grads_per_step, lrs):
  """Straightforward NumPy LARS with the reference's order of operations."""
  w = {m: {n: np.asarray(v, np.float64) for n, v in p.items()} for m, p in params.items()}
  mom = {m: {n: np.zeros_like(v) for n, v in p.items()} for m, p in w.items()}
  for g_tree, lr in zip(grads_per_step, lrs):
    for m in w:
      for n in w[m]:
        g = np.asarray(g_tree[m][n], np.float64)
        excluded = n == "b" or m.split("/")[-1] in ("bn", "gn")
        if excluded:
          u, trust = g, 1.0
        else:
          u = g + WD * w[m][n]
          w_norm, u_norm = np.linalg.norm(w[m][n]), np.linalg.norm(u)
          trust = ETA * w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
        mom[m][n] = MOMENTUM * mom[m][n] + trust * u
        w[m][n] = w[m][n] - lr * mom[m][n]
  return w


def _run_optax(opt, params, grads_per_step):
  state = opt.init(params)
  update = jax.jit(opt.update)
  for g in grads_per_step:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _max_rel_diff(a, b):
  """Largest |a - b| of any tensor, relative to that tensor's largest |b|."""
  return max(float(np.max(np.abs(np.asarray(a[m][n]) - b[m][n]))
                   / (np.max(np.abs(b[m][n])) + 1e-12))
             for m in b for n in b[m])


def test_lars_matches_numpy_reference_with_changing_lr():
  """optim.lars equals the NumPy reference over 6 steps with a new learning rate every step."""
  params = _params()
  # A fixed gradient sequence (independent of params): both sides see the same inputs.
  grads = [_grads(s, params) for s in range(len(LRS))]
  schedule = lambda count: jnp.asarray(LRS)[count]
  got = _run_optax(optim.lars(schedule, weight_decay=WD, momentum=MOMENTUM, eta=ETA),
                   params, grads)
  want = _reference_lars(params, grads, LRS)
  for m in want:
    for n in want[m]:
      np.testing.assert_allclose(got[m][n], want[m][n], rtol=2e-5, atol=1e-6, err_msg=f"{m}/{n}")
  # The zero weight moved (trust 1 on the first step), and the adapted conv moved only a
  # little relative to its norm (trust ratio eta * ||w|| / ||u|| in force).
  assert np.abs(np.asarray(got["projector/linear2"]["w"])).sum() > 0
  w0 = np.asarray(params["encoder/conv1"]["w"])
  assert np.linalg.norm(np.asarray(got["encoder/conv1"]["w"]) - w0) < 0.2 * np.linalg.norm(w0)


def test_optax_builtin_lars_differs_when_lr_changes():
  """optax.lars (lr before momentum) does NOT match the reference when the rate changes,
  but does with a constant rate: the order of lr and momentum is the only difference."""
  params = _params()
  grads = [_grads(s, params) for s in range(len(LRS))]
  kwargs = dict(weight_decay=WD, weight_decay_mask=optim.adaptation_mask,
                trust_ratio_mask=optim.adaptation_mask, trust_coefficient=ETA, momentum=MOMENTUM)

  changing = _run_optax(optax.lars(lambda c: jnp.asarray(LRS)[c], **kwargs), params, grads)
  assert _max_rel_diff(changing, _reference_lars(params, grads, LRS)) > 1e-2

  const = np.full_like(LRS, 0.4)
  constant = _run_optax(optax.lars(lambda c: jnp.asarray(const)[c], **kwargs), params, grads)
  assert _max_rel_diff(constant, _reference_lars(params, grads, const)) < 1e-4


def test_predictor_lr_multiplier_scales_only_the_predictor_s_steps():
  """x3: the predictor's first step is 3x as long; every other tensor's is as at x1; at x1
  the chain (and its state) is the reference's."""
  params = {**_params(), "predictor/linear1": {"w": _params()["projector/linear1"]["w"]}}
  grads = [_grads(0, params)]
  lars = lambda m: optim.lars(lambda c: 0.5, weight_decay=WD, momentum=MOMENTUM, eta=ETA,
                              predictor_lr_multiplier=m)
  one, three = _run_optax(lars(1.0), params, grads), _run_optax(lars(3.0), params, grads)
  for m in params:
    for n in params[m]:
      step1, step3 = one[m][n] - params[m][n], three[m][n] - params[m][n]
      # Each step is read back as (p + step) - p, exact to half an ulp of p, not of the step:
      # 3 x step1 carries 1.5 ulp(p), step3 another 0.5. Measured: 1.2e-7 = 1 ulp at |p| ~ 1
      # (2026-12-07, AMD EPYC VM), where the old atol of 1e-7 sat at the edge; 4 ulp(max |p|).
      ulp = np.finfo(np.float32).eps * float(np.abs(params[m][n]).max())
      np.testing.assert_allclose(step3, 3 * step1 if m.startswith("predictor") else step1,
                                 rtol=1e-5, atol=4 * ulp, err_msg=f"{m}/{n}")
  reference = optim.lars(lambda c: 0.5, weight_decay=WD, momentum=MOMENTUM, eta=ETA)
  assert (jax.tree.structure(lars(1.0).init(params))
          == jax.tree.structure(reference.init(params)))


def test_lars_weight_decay_only_on_adapted_params():
  """With zero gradients, only adapted weights shrink (decay); biases and norm params stay."""
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  got = _run_optax(optim.lars(lambda c: 0.5, weight_decay=WD, momentum=MOMENTUM, eta=ETA),
                   params, [zeros])
  for m in params:
    for n in params[m]:
      before, after = np.asarray(params[m][n]), np.asarray(got[m][n])
      if optim.is_adapted(m, n) and np.abs(before).sum() > 0:
        assert np.linalg.norm(after) < np.linalg.norm(before), f"{m}/{n} was not decayed"
      else:
        np.testing.assert_array_equal(after, before, err_msg=f"{m}/{n} must not change")


@pytest.mark.parametrize("norm", ["batch", "group_ws"])
def test_adaptation_mask_on_real_network_names(norm):
  """Every conv/linear 'w' of the real online network is adapted; every 'b' and every
  bn/gn 'scale'/'offset' is excluded."""
  config = tiny.tiny_config(**{"model.norm": norm})
  nets = networks.make_networks(config.model, config.data.num_classes)
  params, _ = jax.eval_shape(lambda k, x: nets.online.init(k, x, True), jax.random.PRNGKey(0),
                             jnp.zeros((2, *tiny.image_shape(config))))
  mask = optim.adaptation_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(
      jax.tree.map(lambda _: True, params))
  kinds = {"w": 0, "b": 0, "scale": 0, "offset": 0}
  norm_leaf = "bn" if norm == "batch" else "gn"
  for module, p in params.items():
    for name in p:
      kinds[name] += 1
      if name == "w":
        assert mask[module][name], f"{module}/w must be adapted"
      else:
        assert not mask[module][name], f"{module}/{name} must be excluded"
      if name in ("scale", "offset"):
        assert module.split("/")[-1] in ("bn", "gn"), module
  assert set(kinds) == {"w", "b", "scale", "offset"}
  # ResNet-18: 20 convs (17 + 3 downsample) + 4 linears in projector/predictor + probe;
  # biases: the heads' hidden linears and the probe (the heads' output layers have none).
  assert kinds["w"] == 20 + 5
  assert kinds["b"] == 3
  assert kinds["scale"] == kinds["offset"] == 20 + 2
  encoder_norms = {m.split("/")[-1] for m in params if m.startswith("encoder/") and
                   "scale" in params[m]}
  assert encoder_norms == {norm_leaf}
