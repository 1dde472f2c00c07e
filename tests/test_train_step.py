"""The jitted BYOL update step: EMA target, stop-gradients, 1- vs 8-device equivalence,
a short training run, bf16 compute, per-view BatchNorm and batch-size checks."""

import re
import types

import jax
import numpy as np
import pytest

from byol_jax import config_lib
from byol_jax.errors import ConfigError
from byol_jax.model import networks, objectives, resnet
from byol_jax.train import optim, parallel, train_step
from tests import tiny


def _mesh(n):
  return parallel.make_mesh(jax.devices()[:n])


def _setup(config, n_devices=1, with_state=True):
  """Networks, optimizer, the jitted update for an n-device mesh and (unless with_state is
  False) the initial state as host numpy, so every run starts from the very same numbers.

  Configs that differ from the tiny one only outside the model's parameters reuse the
  base fixture's initial state (with_state=False): initialising ResNet-18 costs seconds."""
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = optim.make_optimizer(config)
  mesh = _mesh(n_devices)
  update = train_step.make_update_fn(config, nets, optimizer, mesh, _no_augmentation)
  state0 = None
  if with_state:
    state0 = parallel.fetch(jax.jit(lambda: train_step.init_state(
        config, nets, optimizer, tiny.image_shape(config), seed=0))())
  return types.SimpleNamespace(config=config, nets=nets, optimizer=optimizer, mesh=mesh,
                               update=update, state0=state0)


def _no_augmentation(images, key, view):
  """The views as given: these tests feed float views they made themselves."""
  del key, view
  return images


def _run(setup, batches, state=None, keep=None):
  """Applies `update` to each host batch in turn; returns the host states after the last
  `keep` steps (all by default) and every step's metrics as floats."""
  state = jax.device_put(setup.state0 if state is None else state,
                         parallel.replicated(setup.mesh))
  keep = len(batches) if keep is None else keep
  states, metrics = [], []
  for i, batch in enumerate(batches):
    global_batch = parallel.to_global(batch, setup.mesh)
    assert len(global_batch["view1"].addressable_shards) == setup.mesh.devices.size
    state, m = setup.update(state, global_batch)
    if i >= len(batches) - keep:
      states.append(parallel.fetch(state))
    metrics.append({k: float(v) for k, v in m.items()})
  return states, metrics


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def base():
  """The tiny float32 config on a 1-device mesh; its compiled update is shared."""
  return _setup(tiny.tiny_config())


@pytest.fixture(scope="module")
def first_step(base):
  """One step of `base` from the initial state on a fixed batch."""
  batch = tiny.random_batch(base.config, seed=0)
  (state1,), (metrics,) = _run(base, [batch])
  return batch, state1, metrics


def test_create_state_gives_init_s_parameters_and_the_same_first_step(base, first_step):
  """`create_state` compiles init at XLA optimisation level 1 on a CPU (a cheaper compile).
  Parameters, optimizer state and RNG equal a default compile's bit for bit; the BN averages
  (init's dummy batch) may differ by rounding only, and the first step replaces them, so
  one step from either state gives the same state bit for bit."""
  created = parallel.fetch(train_step.create_state(base.config, base.nets, base.optimizer,
                                                   base.mesh))
  assert jax.tree.structure(created) == jax.tree.structure(base.state0)
  for (path, got), want in zip(_leaves(created), jax.tree.leaves(base.state0)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['average']"):
      # Sums of O(1) activations in another order: float32 rounding, not another value.
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(got, want, err_msg=name)
  batch, state1, _ = first_step
  (from_created,), _ = _run(base, [batch], state=created)
  for (path, got), want in zip(_leaves(from_created), jax.tree.leaves(state1)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


# --- (a) target EMA and the probe's stop-gradient ----------------------------

def test_target_is_ema_of_the_updated_online_network(base, first_step):
  """After one step, target = tau * old_target + (1 - tau) * new_online on encoder+projector."""
  _, state1, metrics = first_step
  s0, tau = base.state0, base.config.base_tau
  np.testing.assert_allclose(metrics["tau"], tau, rtol=1e-7)
  new_online = networks.target_subset(state1.online_params)
  assert jax.tree.structure(new_online) == jax.tree.structure(state1.target_params)
  expected = jax.tree.map(lambda t, o: tau * np.float64(t) + (1 - tau) * np.float64(o),
                          s0.target_params, new_online)
  for (path, got), want in zip(_leaves(state1.target_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=jax.tree_util.keystr(path))
  # Not vacuous: the online network moved, and the target moved by (1 - tau) of that.
  online_move = _max_abs_diff(new_online, networks.target_subset(s0.online_params))
  target_move = _max_abs_diff(state1.target_params, s0.target_params)
  assert online_move > 1e-3
  np.testing.assert_allclose(target_move, (1 - tau) * online_move, rtol=1e-3)


def test_probe_gradient_does_not_reach_the_encoder(base, first_step):
  """The same step with all labels -1 (probe loss 0) leaves every non-probe parameter and
  BN statistic bit-identical; only the probe itself differs."""
  batch, state1, metrics = first_step
  unlabelled = dict(batch, label=np.full_like(batch["label"], -1))
  (state1u,), (metrics_u,) = _run(base, [unlabelled])
  assert metrics["probe_loss"] > 0.1 and metrics_u["probe_loss"] == 0.0
  assert metrics["byol_loss"] == metrics_u["byol_loss"]
  for module in state1.online_params:
    for name, value in state1.online_params[module].items():
      if module == "probe":
        assert not np.array_equal(value, state1u.online_params[module][name])
      else:
        np.testing.assert_array_equal(value, state1u.online_params[module][name],
                                      err_msg=f"{module}/{name}")
  for a, b in zip(jax.tree.leaves((state1.online_state, state1.target_params, state1.target_state)),
                  jax.tree.leaves((state1u.online_state, state1u.target_params,
                                   state1u.target_state))):
    np.testing.assert_array_equal(a, b)


# --- (b) no gradient into the target -----------------------------------------

def test_target_changes_only_through_the_ema(base):
  """With tau = 1 for every step the target parameters stay bit-identical over two steps
  although its forward ran (its BN statistics moved) and the online network trained."""
  setup = _setup(tiny.tiny_config(base_tau=1.0), with_state=False)
  batches = [tiny.random_batch(setup.config, seed=s) for s in (0, 1)]
  states, metrics = _run(setup, batches, state=base.state0)
  assert [m["tau"] for m in metrics] == [1.0, 1.0]
  s0, s2 = base.state0, states[-1]
  for (path, a), b in zip(_leaves(s2.target_params), jax.tree.leaves(s0.target_params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert _max_abs_diff(s2.target_state, s0.target_state) > 1e-4
  assert _max_abs_diff(s2.online_params, s0.online_params) > 1e-3


# --- (c) 1 device == 8 devices -----------------------------------------------

@pytest.mark.parametrize("norm", ["batch", "group_ws"])
def test_one_and_eight_devices_agree(base, norm):
  """The same global batch from the same state on 1 and on 8 devices gives the same losses,
  updated online / target params and BN statistics, for 2 consecutive steps (cross-replica
  BN moments and gradient means are global, not per device).

  Each step starts both meshes from the 1-device state: the cross-device reductions
  re-associate float sums, and a few training steps of this batch-16 net amplify such
  last-bit differences chaotically, which would test the tiny run's sensitivity
  rather than the update's equivalence."""
  one = base if norm == "batch" else _setup(tiny.tiny_config(**{"model.norm": norm}))
  eight = _setup(one.config, n_devices=8, with_state=False)
  assert eight.mesh.devices.size == 8
  state = one.state0
  for seed in (10, 11):
    batch = tiny.random_batch(one.config, seed=seed)
    (s1,), (m1,) = _run(one, [batch], state=state)
    (s8,), (m8,) = _run(eight, [batch], state=state)
    for key in ("byol_loss", "probe_loss", "projection_std"):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    for part in ("online_params", "target_params", "online_state", "target_state", "opt_state"):
      for (path, a), b in zip(_leaves(getattr(s8, part)), jax.tree.leaves(getattr(s1, part))):
        where = f"step {int(s1.step)} {part}{jax.tree_util.keystr(path)}"
        # opt_state holds the momentum of raw gradients, whose BN-scale entries are
        # sums with heavy cancellation: absolute, not relative, float error.
        atol = 5e-5 if part == "opt_state" else 2e-5
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=where)
    # The step did real work: parameters and statistics moved well beyond the tolerance.
    assert _max_abs_diff(s1.online_params, state.online_params) > 1e-2
    assert _max_abs_diff(s1.online_state, state.online_state) > 1e-2
    state = s1
  assert int(state.step) == 2


# --- (d) a short training run ------------------------------------------------

def _prototypes(size):
  """4 shapes (square, disk, horizontal bar, vertical bar) x 4 colours on a dark ground."""
  yy, xx = np.mgrid[:size, :size]
  c = (size - 1) / 2
  shapes = [(abs(yy - c) < size / 4) & (abs(xx - c) < size / 4),
            (yy - c) ** 2 + (xx - c) ** 2 < (size / 3.5) ** 2,
            abs(yy - c) < size / 8, abs(xx - c) < size / 8]
  colours = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.3, 1.0], [1.0, 1.0, 0.2]])
  return np.stack([[np.where(s[..., None], col, 0.1) for col in colours] for s in shapes])


def _view(rng, image):
  """A noisy view: random shift of up to 2 pixels, brightness x U(0.8, 1.2), N(0, 0.1) noise."""
  dy, dx = rng.integers(-2, 3, 2)
  image = np.roll(image, (dy, dx), (0, 1)) * rng.uniform(0.8, 1.2)
  return np.clip(image + rng.normal(0.0, 0.1, image.shape), 0.0, 1.0).astype(np.float32)


def _synthetic_batch(rng, protos, batch_size):
  shape_ids = rng.integers(0, protos.shape[0], batch_size)
  images = protos[shape_ids, rng.integers(0, protos.shape[1], batch_size)]
  return dict(view1=np.stack([_view(rng, im) for im in images]),
              view2=np.stack([_view(rng, im) for im in images]),
              label=shape_ids.astype(np.int32))


def _normalised_projections(nets, state, images):
  out, _ = nets.online.apply(state.online_params, state.online_state,
                             images, True)
  return np.asarray(objectives.l2_normalize(out["projection"]))


def test_training_lowers_loss_without_collapse(base):
  """20 steps on noisy views of coloured-shape prototypes lower the BYOL loss, and the
  l2-normalised projections keep a per-dimension spread (no collapse); the
  projection_std metric matches its definition recomputed from the parameters."""
  config, steps = base.config, 20
  assert steps < config.steps
  rng = np.random.default_rng(0)
  protos = _prototypes(config.data.image_size)
  batches = [_synthetic_batch(rng, protos, config.batch_size) for _ in range(steps)]
  states, metrics = _run(base, batches, keep=2)
  losses = np.array([m["byol_loss"] for m in metrics])
  assert np.all(np.isfinite(losses))
  # A quarter lower in 20 steps (the reference's bias-free heads learn this toy a little
  # slower than heads with an output bias did: 0.73 vs < 0.7 of the start).
  assert losses[-5:].mean() < 0.75 * losses[:2].mean(), losses
  assert losses[-1] < losses[0]
  stds = np.array([m["projection_std"] for m in metrics])
  assert stds.min() > 0.3, stds

  # The last step's metric, recomputed from the parameters it was computed with.
  before_last = states[-2]
  z = _normalised_projections(base.nets, before_last,
                              jax.numpy.asarray(batches[-1]["view1"]))
  d = config.model.projection_dim
  np.testing.assert_allclose(z.std(axis=0).mean() * np.sqrt(d), stds[-1], rtol=1e-4)

  # And from the final parameters on fresh views: every dimension still varies.
  fresh = _synthetic_batch(np.random.default_rng(123), protos, 64)
  z = _normalised_projections(base.nets, states[-1], jax.numpy.asarray(fresh["view1"]))
  per_dim = z.std(axis=0)
  assert per_dim.shape == (d,)
  assert per_dim.mean() * np.sqrt(d) > 0.3, per_dim
  assert per_dim.min() > 0.02, per_dim


# --- (e) bfloat16 compute ----------------------------------------------------

def test_bfloat16_compute_keeps_float32_params(base, first_step):
  """compute_dtype='bfloat16' runs, keeps params / optimizer / BN state float32, and its
  first-step loss is close to (but not bit-equal with) the float32 one."""
  batch, _, metrics32 = first_step
  setup = _setup(tiny.tiny_config(compute_dtype="bfloat16"), with_state=False)
  (state1,), (metrics,) = _run(setup, [batch], state=base.state0)
  for part in ("online_params", "target_params", "opt_state", "online_state", "target_state"):
    for path, leaf in _leaves(getattr(state1, part)):
      if np.issubdtype(leaf.dtype, np.floating):
        assert leaf.dtype == np.float32, f"{part}{jax.tree_util.keystr(path)}: {leaf.dtype}"
      assert np.all(np.isfinite(leaf)), f"{part}{jax.tree_util.keystr(path)}"
  loss16, loss32 = metrics["byol_loss"], metrics32["byol_loss"]
  assert loss16 != loss32
  np.testing.assert_allclose(loss16, loss32, rtol=3e-2)
  np.testing.assert_allclose(metrics["probe_loss"], metrics32["probe_loss"], rtol=5e-2)


def test_float64_compute_holds_no_float32(base):
  """compute_dtype='float64' under jax_enable_x64 (`reference_parity.py --dtype=float64`):
  no value of the whole step, parameters, BN statistics, losses, lr and tau included, is
  float32, so a float64 parity run measures the algorithm, not float32 rounding. The float32
  step (control) holds nothing else."""
  def step_jaxpr(config):
    nets = networks.make_networks(config.model, config.data.num_classes)
    optimizer = optim.make_optimizer(config)
    state = jax.eval_shape(lambda: train_step.init_state(
        config, nets, optimizer, tiny.image_shape(config), seed=0))
    update = train_step.make_update_fn(config, nets, optimizer, _mesh(1), _no_augmentation)
    dtype = networks.param_dtype(config.compute_dtype)
    batch = {k: jax.ShapeDtypeStruct(v.shape, dtype if v.dtype == np.float32 else v.dtype)
             for k, v in tiny.random_batch(config).items()}
    return str(jax.make_jaxpr(update)(state, batch))

  with jax.enable_x64(True):
    text = step_jaxpr(tiny.tiny_config(compute_dtype="float64"))
  assert "f32[" not in text and "f64[" in text
  control = step_jaxpr(base.config)
  assert "f64[" not in control and "f32[" in control


# --- (f) per-view BatchNorm --------------------------------------------------

def _conv1_batch_mean(params, views):
  """Per-channel batch mean of the (ImageNet-stem) first conv's output: what bn1 averages."""
  x = networks.preprocess(jax.numpy.asarray(views))
  y = jax.lax.conv_general_dilated(x, params["encoder/conv1"]["w"], (2, 2), ((3, 3), (3, 3)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return np.asarray(y, np.float64).mean(axis=(0, 1, 2))


def test_batchnorm_is_per_view_unless_merged(base, first_step):
  """By default each view is its own BN batch (bn1's moving mean takes two updates, from
  the view-1 then the view-2 batch mean); merge_views_bn=True takes one update from the
  mean over both views, and changes the loss."""
  batch, state1, metrics = first_step
  assert base.config.model.stem == "imagenet"
  merged = _setup(tiny.tiny_config(**{"model.merge_views_bn": True}), with_state=False)
  (state1m,), (metrics_m,) = _run(merged, [batch], state=base.state0)
  assert np.isfinite(metrics_m["byol_loss"])
  assert abs(metrics_m["byol_loss"] - metrics["byol_loss"]) > 1e-4

  d = resnet.BN_DECAY
  m1 = _conv1_batch_mean(base.state0.online_params, batch["view1"])
  m2 = _conv1_batch_mean(base.state0.online_params, batch["view2"])
  assert np.max(np.abs(m1 - m2)) > 1e-2      # the views differ in brightness
  key = "encoder/bn1/bn/~/mean_ema"
  for part in ("online_state", "target_state"):   # target == online at step 0
    h0 = np.asarray(getattr(base.state0, part)[key]["hidden"], np.float64).reshape(-1)
    c0 = int(getattr(base.state0, part)[key]["counter"])
    per_view, one_batch = getattr(state1, part)[key], getattr(state1m, part)[key]
    assert int(per_view["counter"]) == c0 + 2 and int(one_batch["counter"]) == c0 + 1
    np.testing.assert_allclose(per_view["hidden"].reshape(-1),
                               d * d * h0 + d * (1 - d) * m1 + (1 - d) * m2,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one_batch["hidden"].reshape(-1),
                               d * h0 + (1 - d) * (m1 + m2) / 2, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def cifar_stem():
  """A better-conditioned tiny net (BN over 16 x 4+ values per channel everywhere) for
  comparing two ways of computing the same step: at the ImageNet stem's 1x1 maps the
  last-bit differences of re-associated sums grow ~1e3x in a step (see tiny.py)."""
  return _setup(tiny.tiny_config(**{"model.stem": "cifar", "model.base_channels": 8}))


def test_views_in_one_pass_is_the_same_math(cifar_stem):
  """Both views in one forward (BN statistics per view, moving averages updated view 1 then
  view 2) compute the default step: the same losses and updated state to float tolerance,
  as close as 1 and 8 devices of either, step by step from the same state."""
  config = tiny.tiny_config(**{"model.stem": "cifar", "model.base_channels": 8,
                               "model.views_in_one_pass": True})
  one, eight = _setup(config, with_state=False), _setup(config, n_devices=8, with_state=False)
  state = cifar_stem.state0
  for seed in (10, 11):
    batch = tiny.random_batch(config, seed=seed)
    (s0,), (m0,) = _run(cifar_stem, [batch], state=state)
    for setup in (one, eight):
      (s1,), (m1,) = _run(setup, [batch], state=state)
      for key in ("byol_loss", "probe_loss", "projection_std"):
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, err_msg=key)
      for part in ("online_params", "target_params", "online_state", "target_state", "opt_state"):
        for (path, a), b in zip(_leaves(getattr(s1, part)), jax.tree.leaves(getattr(s0, part))):
          np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5,
                                     err_msg=f"{part}{jax.tree_util.keystr(path)}")
    assert _max_abs_diff(s0.online_state, state.online_state) > 1e-2
    state = s0


def _convolution_shapes(setup, state, batch):
  """The result types of the lowered step's convolutions, in order (lowering for CPU keeps
  only platform_dependent's CPU branch)."""
  text = setup.update.lower(state, batch).as_text()
  return re.findall(r"stablehlo.convolution.*-> (tensor<[^>]+>)", text)


def test_views_in_one_pass_auto_is_two_passes_on_cpu(cifar_stem):
  """"auto" lowers the two-pass step on CPU (where it is faster); True doubles every
  convolution's batch instead. A value that is none of the three is one line."""
  batch = tiny.random_batch(cifar_stem.config, seed=10)
  shapes = {}
  for value in ("auto", False, True):
    config = tiny.tiny_config(**{"model.stem": "cifar", "model.base_channels": 8,
                                 "model.views_in_one_pass": value})
    shapes[value] = _convolution_shapes(_setup(config, with_state=False), cifar_stem.state0,
                                        batch)
  assert shapes["auto"] == shapes[False] and shapes[False] != shapes[True]
  assert train_step.views_in_one_pass(config_lib.load("resnet50_imagenet").model) == "auto"
  with pytest.raises(ConfigError, match="model.views_in_one_pass must be True, False or 'auto'"):
    train_step.views_in_one_pass(tiny.tiny_config(**{"model.views_in_one_pass": "yes"}).model)


# --- (g) batch-size check ----------------------------------------------------

def test_check_batch_size():
  """A global batch that does not divide over the devices raises a ValueError naming the
  batch size and the device count; a dividing one returns the per-process batch."""
  assert parallel.check_batch_size(16, _mesh(8)) == 16
  assert parallel.check_batch_size(24, _mesh(3)) == 24
  with pytest.raises(ValueError) as err:
    parallel.check_batch_size(12, _mesh(8))
  assert "12" in str(err.value) and "8 devices" in str(err.value)
  with pytest.raises(ValueError) as err:
    parallel.check_batch_size(16, _mesh(3))
  assert "16" in str(err.value) and "3 devices" in str(err.value)


# --- (h) the reference's layout and back -------------------------------------

def test_a_state_mapped_to_the_reference_and_back_steps_as_its_own(base, first_step):
  """byol_jax's state after a step (non-zero momentum, target apart from online, moved BN
  statistics, step 1), written in the reference's layout (`from_train_state`) and read back
  (`to_train_state`, as reference_parity.py reads the reference's), is bit-identical, and its
  next step equals the original's: the mapping neither loses nor transposes a tensor, and
  carries the step to both counters the schedules read."""
  from byol_jax.interop import reference_checkpoint  # pylint: disable=g-import-not-at-top
  setup = _setup(tiny.tiny_config(**{"model.padding": "haiku_same"}), with_state=False)
  (state1,), _ = _run(setup, [first_step[0]], state=base.state0)
  model = setup.config.model
  reference = reference_checkpoint.from_train_state(state1, model)
  assert "res_net18/~/block_group_1/~/block_0/~/shortcut_batchnorm/~/var_ema" in (
      reference.target_state)
  assert set(reference.opt_state[1].mu) == set(reference.online_params)
  back = reference_checkpoint.to_train_state(reference, int(state1.step), model,
                                             setup.optimizer, rng=state1.rng)
  assert jax.tree.structure(back) == jax.tree.structure(state1)
  for (path, a), b in zip(_leaves(back), jax.tree.leaves(state1)):
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  batch = tiny.random_batch(setup.config, seed=1)
  (ours,), (m_ours,) = _run(setup, [batch], state=state1)
  (mapped,), (m_mapped,) = _run(setup, [batch], state=back)
  assert m_mapped == m_ours
  for (path, a), b in zip(_leaves(mapped), jax.tree.leaves(ours)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert int(mapped.step) == 2
