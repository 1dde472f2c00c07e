"""ResNet encoders and the online / target networks: shapes, sizes, names, GN + WS."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from byol_jax.model import networks, resnet
from tests import tiny

KEY = jax.random.PRNGKey(0)


def _encoder_fn(**kwargs):
  return hk.transform_with_state(lambda x: resnet.ResNet(**kwargs)(x, is_training=True))


def _encoder_shapes(images_shape, **kwargs):
  """(params, state, embedding) as ShapeDtypeStructs: traced only, nothing computed."""
  f = _encoder_fn(**kwargs)

  def init_and_apply(key, x):
    params, state = f.init(key, x)
    return params, state, f.apply(params, state, None, x)[0]

  return jax.eval_shape(init_and_apply, KEY, jnp.zeros(images_shape, jnp.float32))


def _count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("depth", sorted(resnet.ARCHITECTURES))
def test_embedding_dim(depth, width):
  """Embedding is 512*w for ResNet-18/34 and 2048*w for 50 and deeper (jax.eval_shape only)."""
  expected = (512 if depth in (18, 34) else 2048) * width
  _, _, embedding = _encoder_shapes((2, 32, 32, 3), depth=depth, width=width)
  assert embedding.shape == (2, expected)
  assert resnet.embedding_dim(depth, width) == expected


def _torchvision_count(depth):
  """Parameters of torchvision's resnet{depth} minus its fc, counted from the layout:
  convs without bias, BN weight + bias per channel, 1x1 downsample on each stage's
  first block when the stride or channel count changes."""
  kind, blocks = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}[depth]
  total = 7 * 7 * 3 * 64 + 2 * 64            # conv1 + bn1
  expansion = 4 if kind == "bottleneck" else 1
  cin = 64
  for stage, n in enumerate(blocks):
    c = 64 * 2**stage
    for b in range(n):
      if kind == "basic":
        convs = [(cin, c, 3), (c, c, 3)]
      else:
        convs = [(cin, c, 1), (c, c, 3), (c, 4 * c, 1)]
      if b == 0 and (stage > 0 or cin != c * expansion):
        convs.append((cin, c * expansion, 1))
      total += sum(i * o * k * k + 2 * o for i, o, k in convs)
      cin = c * expansion
  return total


def test_parameter_counts_match_torchvision():
  """ResNet-50 1x encoder has torchvision resnet50's 25,557,032 - fc (2048*1000+1000)
  = 23,508,032 parameters; ResNet-18 has 11,689,512 - 513,000 = 11,176,512."""
  assert _torchvision_count(50) == 25_557_032 - (2048 * 1000 + 1000) == 23_508_032
  assert _torchvision_count(18) == 11_689_512 - (512 * 1000 + 1000) == 11_176_512
  params50, state50, _ = _encoder_shapes((1, 64, 64, 3), depth=50)
  assert _count(params50) == 23_508_032
  params18, _, _ = _encoder_shapes((1, 64, 64, 3), depth=18)
  assert _count(params18) == 11_176_512
  # BN running statistics are state (torchvision buffers), not parameters: mean and var
  # per channel of each of the 53 BN layers.
  bn_channels = sum(int(np.prod(v["scale"].shape)) for v in params50.values() if "scale" in v)
  means = [v["hidden"] for m, v in state50.items() if m.endswith("mean_ema")]
  assert len(means) == 53 and sum(int(np.prod(h.shape)) for h in means) == bn_channels
  # GroupNorm + WS has the same parameterisation (GN scale/offset per channel, no stats).
  params_gn, state_gn, _ = _encoder_shapes((1, 64, 64, 3), depth=50, norm="group_ws")
  assert _count(params_gn) == 23_508_032 and not state_gn


def test_size_gives_the_parameter_count_and_resnet18_s_flops_at_224():
  """`networks.size` (the run's first log lines): ResNet-18's 11,176,512 encoder parameters,
  and XLA's count of its forward at 224 px just under torchvision's 1.82 G multiply-adds x 2:
  XLA skips the kernel taps that fall in the zero padding, which torchvision counts."""
  nets = networks.make_networks(tiny.tiny_config(**{
      "model.depth": 18, "model.base_channels": 64, "model.stem": "imagenet"}).model, 10)
  params, state = jax.eval_shape(lambda: nets.online.init(KEY, jnp.zeros((2, 224, 224, 3)),
                                                          True))
  size = networks.size(nets, params, state, 224)
  assert size["encoder_params"] == 11_176_512 and size["online_params"] == _count(params)
  assert 0.9 * 2 * 1.82e9 < size["encoder_flops_per_image"] < 2 * 1.82e9
  assert networks.size_line(size, 224).startswith("encoder 11,176,512 parameters (online ")


def _layer1_input_shape(stem, size):
  shapes = {}

  def record(next_f, args, kwargs, context):
    if context.method_name == "__call__":
      shapes[context.module.module_name] = args[0].shape
    return next_f(*args, **kwargs)

  def fn(x):
    with hk.intercept_methods(record):
      return resnet.ResNet(depth=18, stem=stem)(x, is_training=True)

  f = hk.transform_with_state(fn)
  jax.eval_shape(lambda k, x: f.init(k, x), KEY, jnp.zeros((2, size, size, 3)))
  return shapes["encoder/layer1_0"]


def test_cifar_stem_keeps_resolution_imagenet_stem_downsamples_4x():
  """Into layer1: 32x32 stays 32x32 with the CIFAR stem, becomes 8x8 with the ImageNet stem."""
  assert _layer1_input_shape("cifar", 32) == (2, 32, 32, 64)
  assert _layer1_input_shape("imagenet", 32) == (2, 8, 8, 64)
  assert _layer1_input_shape("imagenet", 224) == (2, 56, 56, 64)


@pytest.mark.parametrize("kwargs, must_mention", [
    (dict(depth=42), ["42", "18", "34", "50", "101", "152", "200"]),
    (dict(stem="tiny"), ["'tiny'", "imagenet", "cifar"]),
    (dict(norm="layer"), ["'layer'", "batch", "group_ws"]),
    (dict(width=0), ["0", "1..4"]),
    (dict(width=1.5), ["1.5", "1..4"]),
])
def test_bad_arguments_raise_readable_errors(kwargs, must_mention):
  """Unsupported depth / stem / norm / width raise ValueError naming the bad value and the
  valid choices, both from ResNet and through make_networks."""
  f = _encoder_fn(**kwargs)
  with pytest.raises(ValueError) as err:
    f.init(KEY, jnp.zeros((1, 32, 32, 3)))
  for word in must_mention:
    assert word in str(err.value), (word, str(err.value))

  model = ml_collections.ConfigDict({**tiny.tiny_config().model.to_dict(), **kwargs})
  nets = networks.make_networks(model, num_classes=4)
  with pytest.raises(ValueError):
    nets.online.init(KEY, jnp.zeros((1, 32, 32, 3)), True)


def _online_and_target_shapes(config):
  nets = networks.make_networks(config.model, config.data.num_classes)
  x = jnp.zeros((2, *tiny.image_shape(config)))
  online = jax.eval_shape(lambda k, x: nets.online.init(k, x, True), KEY, x)
  target = jax.eval_shape(lambda k, x: nets.target.init(k, x, True), KEY, x)
  return online, target


@pytest.mark.parametrize("norm", ["batch", "group_ws"])
def test_target_tree_is_the_online_encoder_projector_subset(norm):
  """Target params/state have exactly the structure and shapes of target_subset(online),
  which keeps encoder and projector and drops predictor and probe."""
  (on_p, on_s), (tg_p, tg_s) = _online_and_target_shapes(tiny.tiny_config(**{"model.norm": norm}))
  for online_tree, target_tree in ((on_p, tg_p), (on_s, tg_s)):
    subset = networks.target_subset(online_tree)
    assert jax.tree.structure(subset) == jax.tree.structure(target_tree)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), subset) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), target_tree)
  tops = lambda tree: {m.split("/")[0] for m in tree}
  assert tops(on_p) == {"encoder", "projector", "predictor", "probe"}
  assert tops(tg_p) == {"encoder", "projector"}
  assert tops(networks.target_subset(on_p)) == {"encoder", "projector"}
  assert on_p["probe"]["w"].shape == (512, tiny.NUM_CLASSES)
  assert tops(networks.encoder_subset(on_p)) == {"encoder"}


def test_group_norm_ws_network_builds_and_runs():
  """norm='group_ws' builds an encoder of WS convs + GroupNorm (no BN, no encoder state)
  whose forward gives finite, non-constant embeddings."""
  config = tiny.tiny_config(**{"model.norm": "group_ws"})
  (params, state), _ = _online_and_target_shapes(config)
  encoder_modules = [m for m in params if m.startswith("encoder/")]
  assert all(m.endswith("/gn") or set(params[m]) == {"w"} for m in encoder_modules)
  assert sum(m.endswith("/gn") for m in encoder_modules) == 20
  assert not any(m.endswith("/bn") for m in encoder_modules)
  assert not networks.encoder_subset(state)      # GroupNorm keeps no statistics

  nets = networks.make_networks(config.model, config.data.num_classes)

  @jax.jit
  def init_and_embed(key, x):
    p, s = nets.encoder.init(key, x, True)
    return nets.encoder.apply(p, s, x, True)[0]

  x = jax.random.uniform(KEY, (4, *tiny.image_shape(config)))
  embedding = init_and_embed(KEY, x)
  assert embedding.shape == (4, 512) and bool(jnp.all(jnp.isfinite(embedding)))
  assert float(jnp.std(embedding, axis=0).mean()) > 0


def _ws_conv():
  def fn(x):
    module = resnet.conv("group_ws", 8, 3, 1, "c")
    assert module.standardize
    return module(x)
  return hk.transform(fn)


def test_ws_conv_effective_kernel_is_standardised():
  """A weight-standardised conv's effective kernel (read off as the Jacobian of one output pixel) has mean 0
  and variance 1 per output channel and equals (w - mean) / std of the raw weight."""
  f = _ws_conv()
  x = jax.random.normal(KEY, (1, 3, 3, 5))
  params = f.init(KEY, x)
  w = np.asarray(params["c"]["w"], np.float64)                     # [3, 3, 5, 8]
  assert w.shape == (3, 3, 5, 8)
  # The raw weight is He-initialised (fan out), nowhere near unit variance.
  assert np.all(w.var(axis=(0, 1, 2)) < 0.1)
  # Output pixel (1, 1) of a 3x3 conv with padding 1 sees the whole 3x3 input, so
  # d out[0, 1, 1, o] / d x[0, i, j, c] is exactly kernel[i, j, c, o].
  jac = jax.jacobian(lambda x: f.apply(params, None, x)[0, 1, 1, :])(x)   # [8, 1, 3, 3, 5]
  kernel = np.moveaxis(np.asarray(jac, np.float64)[:, 0], 0, -1)          # [3, 3, 5, 8]
  np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(kernel.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)
  standardised = (w - w.mean(axis=(0, 1, 2))) / w.std(axis=(0, 1, 2))
  np.testing.assert_allclose(kernel, standardised, rtol=1e-4, atol=1e-5)


def test_ws_conv_is_invariant_to_affine_changes_of_its_weight():
  """Standardisation makes the output unchanged when each output channel's raw kernel is
  scaled by a positive factor and shifted; a plain conv would change."""
  f = _ws_conv()
  x = jax.random.normal(KEY, (2, 6, 6, 5))
  params = f.init(KEY, x)
  w = params["c"]["w"]
  scale = jnp.linspace(0.5, 4.0, 8)
  shift = jnp.linspace(-1.0, 1.0, 8)
  moved = {"c": {"w": w * scale + shift}}
  np.testing.assert_allclose(f.apply(moved, None, x), f.apply(params, None, x),
                             rtol=1e-4, atol=1e-4)
  plain = hk.transform(lambda x: resnet.conv("batch", 8, 3, 1, "c")(x))
  assert not np.allclose(plain.apply(moved, None, x), plain.apply(params, None, x), atol=1e-2)


@pytest.mark.parametrize("norm", ["batch", "group_ws"])
@pytest.mark.parametrize("stride,padding,side", [(1, "torchvision", 6), (2, "torchvision", 7),
                                                 (2, "haiku_same", 6), (2, "haiku_same", 7)])
def test_pointwise_conv_as_a_matmul_equals_the_convolution(norm, stride, padding, side):
  """1x1 kernels run as a matmul: same output and gradients as XLA's convolution of the
  same (standardised) kernel with the padding the config names."""
  f = hk.without_apply_rng(hk.transform(
      lambda x: resnet.conv(norm, 8, 1, stride, "c", padding=padding)(x)))
  x = jax.random.normal(KEY, (2, side, side, 5))
  params = f.init(KEY, x)
  assert params["c"]["w"].shape == (1, 1, 5, 8)

  def by_conv(params, x):
    w = params["c"]["w"]
    if norm == "group_ws":
      w = (w - w.mean(axis=(0, 1, 2))) * jax.lax.rsqrt(w.var(axis=(0, 1, 2)) + resnet.WS_EPS)
    pads = "SAME" if padding == "haiku_same" else ((0, 0), (0, 0))
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  np.testing.assert_allclose(f.apply(params, x), by_conv(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(p, x)))
  got = jax.grad(loss(f.apply), argnums=(0, 1))(params, x)
  want = jax.grad(loss(by_conv), argnums=(0, 1))(params, x)
  for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", resnet.PADDINGS)
@pytest.mark.parametrize("side", [5, 6, 9, 12])
def test_stem_max_pool_equals_reduce_window(padding, side):
  """The nine-slice max-pool gives lax.reduce_window's values, and its gradient where no
  window ties (continuous random inputs)."""
  pads = "SAME" if padding == "haiku_same" else ((0, 0), (1, 1), (1, 1), (0, 0))
  reference = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                              (1, 2, 2, 1), pads)
  x = jax.random.normal(KEY, (2, side, side + 1, 3))
  weights = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
  grad = lambda fn: jax.grad(lambda x: jnp.sum(fn(x) * weights))(x)
  for pool in (resnet.max_pool_3x3_s2, resnet.max_pool_slices, resnet.max_pool_reduce_window):
    ours = lambda x, pool=pool: pool(x, padding)
    np.testing.assert_array_equal(ours(x), reference(x))
    np.testing.assert_array_equal(grad(ours), grad(reference))


def test_stem_max_pool_is_nine_slices_on_cpu_and_reduce_window_elsewhere():
  """The step lowered for CPU takes maxima of slices; for TPU (and GPU) a reduce_window,
  whose gradient is a select-and-scatter."""
  step = jax.jit(jax.grad(lambda x: jnp.sum(resnet.max_pool_3x3_s2(x, "torchvision"))))
  x = jnp.zeros((1, 8, 8, 2))
  for platform in ("cpu", "tpu", "cuda"):
    text = step.trace(x).lower(lowering_platforms=(platform,)).as_text()
    cpu = platform == "cpu"
    assert ("stablehlo.maximum" in text) == cpu, platform
    assert ("select_and_scatter" in text) != cpu, platform
