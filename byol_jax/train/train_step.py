"""The BYOL training state and its one jitted, data-parallel update step.

One call of `update` does all of a BYOL step on every device of every process:
device-side augmentation of the two views, the online and target forwards (BN
per view, as in the reference), the symmetric loss and the probe's loss, the
LARS update and the target EMA.
"""

import functools
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from byol_jax.data import batch as batch_lib
from byol_jax.errors import ConfigError
from byol_jax.model import networks as networks_lib
from byol_jax.model import objectives
from byol_jax.train import optim, parallel


class TrainState(NamedTuple):
  step: jax.Array
  rng: jax.Array  # raw uint32[2] key data: checkpoints hold plain arrays
  online_params: hk.Params
  online_state: hk.State
  target_params: hk.Params
  target_state: hk.State
  opt_state: Any


def init_state(config, nets: networks_lib.Networks, optimizer, image_shape, seed: int) -> TrainState:
  """Initial state; the target starts as a copy of the online encoder and projector."""
  init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
  dummy = jnp.zeros((2, *image_shape), networks_lib.param_dtype(config.compute_dtype))
  params, state = nets.online.init(init_key, dummy, True)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=run_key,
                    online_params=params, online_state=state,
                    target_params=networks_lib.target_subset(params),
                    target_state=networks_lib.target_subset(state),
                    opt_state=optimizer.init(params))


# Init runs once, yet on a CPU compiling it (the parameters' threefry draws) takes ~7 s for the
# demo's net; XLA's backend optimisation level 1 makes that ~3 (benchmarks/init_compile.py).
# The parameters come out bit-identical (tests/test_train_step.py); only the BN averages of
# init's dummy batch may move by rounding, and the first training-mode forward replaces those
# (zero-debiased EMA). Accelerators compile init as before: nothing was measured there.
CPU_INIT_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1}


def initial_state_fn(config, nets: networks_lib.Networks, optimizer) -> Callable[[], TrainState]:
  """`init_state` for `config.seed` and image size, as a function of no arguments."""
  size = config.data.image_size
  return functools.partial(init_state, config, nets, optimizer, (size, size, 3), config.seed)


def create_state(config, nets: networks_lib.Networks, optimizer, mesh) -> TrainState:
  """The initial state, replicated over `mesh` (for shapes alone, `jax.eval_shape` of
  `initial_state_fn`: this compiles)."""
  init = jax.jit(initial_state_fn(config, nets, optimizer),
                 out_shardings=parallel.replicated(mesh))
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return init.lower().compile(compiler_options=CPU_INIT_COMPILE_OPTIONS if on_cpu else None)()


AugmentFn = Callable[[jax.Array, jax.Array, int], jax.Array]


def views_in_one_pass(model_config):
  """model.views_in_one_pass as True, False or "auto" (a flag may give it as text)."""
  value = model_config.views_in_one_pass
  text = str(value).strip().lower()
  if text in ("true", "false"):
    return text == "true"
  if text != "auto":
    raise ConfigError(f"model.views_in_one_pass must be True, False or 'auto', got {value!r}.")
  return "auto"


def make_update_fn(config, nets: networks_lib.Networks, optimizer, mesh, augment: AugmentFn):
  """Returns jitted `update(state, batch) -> (state, metrics)`.

  `batch` is a `data.batch.PretrainBatch` of either variant, sharded along the
  mesh's data axis: host views, or in-memory images that `batch.raw_views` cuts
  here (the jit traces one update per variant). `augment`
  takes (images, key, view_index) and returns float views in [0, 1]; it gets
  one key per view and must split it per example of the global batch (as
  `device_augment.device_augment` does), so no two examples on any device share
  randomness and the result does not depend on the device count.
  """
  lr_fn, tau_fn = optim.schedules(config)
  compute_dtype = jnp.dtype(config.compute_dtype)
  out_dtype = networks_lib.param_dtype(compute_dtype)  # of outputs, losses and gradients
  merge_views = config.model.merge_views_bn
  one_pass = True if merge_views else views_in_one_pass(config.model)
  projection_dim = config.model.projection_dim

  def cast(tree):
    return networks_lib.cast_floating(tree, compute_dtype)

  def forward(transformed, params, state, view1, view2):
    """Applies a network to both views; BN statistics per view unless merged."""
    if one_pass == "auto":
      # Chosen when the step is lowered: two passes on CPU (1.36x faster there, issue #30);
      # one on TPU (fewer HBM bytes, experiments/tpu_scale.md) and on NVIDIA GPUs (two crash
      # XLA:GPU's Triton GEMM fusion in jax 0.10.2, experiments/gpu_scale.md).
      one, two = (functools.partial(forward_views, transformed, together)
                  for together in (True, False))
      return jax.lax.platform_dependent(params, state, view1, view2, cpu=two, default=one)
    return forward_views(transformed, one_pass, params, state, view1, view2)

  def forward_views(transformed, together, params, state, view1, view2):
    if together:
      # Rows interleave the views (example-major), so each device keeps its own examples.
      both = jnp.stack([view1, view2], axis=1).reshape(-1, *view1.shape[1:])
      out, state = transformed.apply(cast(params), state, cast(both), True,
                                     1 if merge_views else 2)
      out = networks_lib.cast_floating(out, out_dtype)
      views = [jax.tree.map(lambda x, v=v: x.reshape(-1, 2, *x.shape[1:])[:, v], out)
               for v in (0, 1)]
      return views[0], views[1], state
    out1, state = transformed.apply(cast(params), state, cast(view1), True)
    out2, state = transformed.apply(cast(params), state, cast(view2), True)
    return (networks_lib.cast_floating(out1, out_dtype),
            networks_lib.cast_floating(out2, out_dtype), state)

  def loss_fn(online_params, state: TrainState, view1, view2, labels):
    on1, on2, online_state = forward(nets.online, online_params, state.online_state, view1, view2)
    tg1, tg2, target_state = forward(nets.target, state.target_params, state.target_state,
                                     view1, view2)
    byol = objectives.byol_loss(on1["prediction"], on2["prediction"],
                                tg1["projection"], tg2["projection"])
    probe, hits = objectives.softmax_cross_entropy(on1["logits"], labels)
    projections = objectives.l2_normalize(on1["projection"])
    aux = dict(online_state=online_state, target_state=target_state, byol_loss=byol,
               probe_loss=probe, probe_top1=hits["top1"] / jnp.maximum(jnp.sum(labels >= 0), 1),
               # ~1 for spread-out projections, -> 0 under collapse.
               projection_std=jnp.mean(jnp.std(projections, axis=0)) * jnp.sqrt(projection_dim))
    return byol + probe, aux

  def update(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    key1, key2 = jax.random.split(key)
    raw1, raw2 = batch_lib.raw_views(config, batch)  # cut here from in-memory images
    view1 = augment(raw1, key1, 0)
    view2 = augment(raw2, key2, 1)
    grads, aux = jax.grad(loss_fn, has_aux=True)(state.online_params, state, view1, view2,
                                                 batch["label"])
    updates, opt_state = optimizer.update(grads, state.opt_state, state.online_params)
    online_params = optax.apply_updates(state.online_params, updates)
    tau = tau_fn(state.step)
    target_params = optim.ema(state.target_params, networks_lib.target_subset(online_params), tau)
    new_state = TrainState(step=state.step + 1, rng=state.rng, online_params=online_params,
                           online_state=aux.pop("online_state"), target_params=target_params,
                           target_state=aux.pop("target_state"), opt_state=opt_state)
    metrics = dict(aux, loss=aux["byol_loss"] + aux["probe_loss"],
                   learning_rate=lr_fn(state.step), tau=tau)
    return new_state, metrics

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(update, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=0)


def make_embed_fn(nets: networks_lib.Networks, mesh):
  """Jitted eval forward: images -> {embedding, projection, logits}, BN in inference mode."""

  def embed(online_params, online_state, images):
    out, _ = nets.online.apply(online_params, online_state, images, False)
    return {k: out[k] for k in ("embedding", "projection", "logits")}

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(embed, in_shardings=(repl, repl, data), out_shardings=data)
