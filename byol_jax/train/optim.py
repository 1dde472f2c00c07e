"""LARS and the learning-rate and EMA schedules, exactly as BYOL defines them."""

import functools
import math

import jax
import jax.numpy as jnp
import optax

from byol_jax.model import networks


def learning_rate(step, *, base_lr, batch_size, warmup_steps, total_steps, dtype=jnp.float32):
  """base_lr * batch/256, linear warm-up from 0, then cosine decay to 0 at total_steps."""
  peak = base_lr * batch_size / 256.0
  step = jnp.asarray(step, dtype)
  warm = peak * step / max(warmup_steps, 1)
  progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
  cosine = peak * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
  return jnp.where(step < warmup_steps, warm, cosine)


def target_decay(step, *, base_tau, total_steps, dtype=jnp.float32):
  """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
  k = jnp.clip(jnp.asarray(step, dtype), 0.0, total_steps)
  return 1.0 - (1.0 - base_tau) * (jnp.cos(math.pi * k / total_steps) + 1.0) / 2.0


def is_adapted(module_name: str, param_name: str) -> bool:
  """Weight decay and LARS adaptation apply to weights, never to biases or norm params."""
  leaf = module_name.split("/")[-1]
  is_norm = leaf in ("bn", "gn") or "norm" in leaf
  return not (param_name == "b" or is_norm)


def adaptation_mask(params):
  return {m: {n: is_adapted(m, n) for n in p} for m, p in params.items()}


def lars(schedule, *, weight_decay, momentum=0.9, eta=1e-3, predictor_lr_multiplier=1.0):
  """LARS in the reference's order: decay, trust ratio, momentum, then lr.

  `optax.lars` scales by the learning rate before the momentum trace, so with a
  schedule the momentum buffer holds past learning rates; the reference keeps
  the momentum of the unscaled update and applies the current rate last. The
  two differ whenever the rate changes (all of warm-up and decay), hence this
  chain. The trust ratio is eta ||w|| / ||u|| per parameter tensor, 1 when
  either norm is 0.

  `predictor_lr_multiplier` scales the predictor's rate: a faster predictor
  stays nearer its optimum, which the BYOL paper (Table 21) shows can replace
  the moving average. At 1 the chain is the reference's, state and all.
  """
  chain = [
      optax.add_decayed_weights(weight_decay, mask=adaptation_mask),
      # optax's scale_by_trust_ratio takes no mask: wrap it, so excluded params keep trust 1.
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta, eps=0.0), adaptation_mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(schedule),
  ]
  if predictor_lr_multiplier != 1.0:
    chain.append(optax.masked(optax.scale(predictor_lr_multiplier), predictor_mask))
  return optax.chain(*chain)


def predictor_mask(params):
  return {m: {n: m.split("/")[0] == "predictor" for n in p} for m, p in params.items()}


def lars_momentum(opt_state):
  """The momentum buffer of `lars`'s state (one tensor per parameter)."""
  return optax.tree_utils.tree_get(opt_state, "trace")


def lars_state(optimizer, params, momentum, step):
  """`optimizer.init(params)` (a `lars`) holding `momentum` at schedule step `step`.

  The learning rate reads the step from optax's own counter, so a state taken
  over at step k must carry k there as well as in `TrainState.step`.
  """
  return optax.tree_utils.tree_set(optimizer.init(params), trace=momentum,
                                   count=jnp.asarray(step, jnp.int32))


def ema(target, online, tau):
  return jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)


def schedules(config):
  """lr(step) and tau(step) for a config with `steps` and `warmup_steps` filled in, in the
  parameters' dtype."""
  dtype = networks.param_dtype(config.compute_dtype)
  lr = functools.partial(learning_rate, base_lr=config.optimizer.base_lr,
                         batch_size=config.batch_size,
                         warmup_steps=config.warmup_steps, total_steps=config.steps, dtype=dtype)
  if config.tau_schedule == "constant":
    tau = lambda step: jnp.full((), config.base_tau, dtype)
  else:
    tau = functools.partial(target_decay, base_tau=config.base_tau,
                            total_steps=config.steps, dtype=dtype)
  return lr, tau


def make_optimizer(config):
  lr, _ = schedules(config)
  return lars(lr, weight_decay=config.optimizer.weight_decay,
              momentum=config.optimizer.momentum, eta=config.optimizer.eta,
              predictor_lr_multiplier=config.optimizer.predictor_lr_multiplier)
