"""DeepMind's released BYOL checkpoints import into byol_jax and export to PyTorch exactly.

The released files cannot be downloaded here, so each test writes one: a
network with the reference's module names (byol/utils/networks.py: a torso of
`hk.nets.ResNet` block groups, "SAME" padding, the MLPs and the online
classifier), random weights and BatchNorm statistics, pickled at protocol 2 in
the released structure and naming the reference's globals as dill wrote them
(`dill._dill._create_namedtuple`, `dill._dill._create_array`, Haiku's
`FlatMapping`, numpy 1.x's `numpy.core.multiarray`). Nothing of dill or of the
reference exists when the file is read.
"""

import collections
import functools
import os
import pickle
import sys
import types

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from byol_jax.configs import base as base_config  # noqa: E402
from byol_jax.interop import (  # noqa: E402
    export, reference_checkpoint, reference_pickle, torch_resnet)
from byol_jax.jobs import export as export_job  # noqa: E402
from byol_jax.jobs import import_reference  # noqa: E402
from byol_jax.model import networks  # noqa: E402
from byol_jax.train import checkpoint, optim, parallel, train_step  # noqa: E402
from tests.test_export import random_init, torch_eval  # noqa: E402

BATCH = 2
HIDDEN, PROJ_DIM, NUM_CLASSES = 32, 16, 10
# byol_jax vs the reference network, both JAX float32 on the same inputs: measured exactly
# equal (2026-12-07, AMD EPYC VM); 1e-5 allows other fusions of the same ops.
ATOL = 1e-5
# PyTorch float64 vs the reference network run in float64 (jax.enable_x64, float64 params):
# both sides really compute in float64 here, measured 2.8e-12 apart (ResNet-50, 2026-12-07,
# AMD EPYC VM); 1e-9 leaves ~350x. A layout or padding mistake is off by > 1e-2.
TORCH_ATOL = 1e-9
STATE_FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")


# --------------------------------------------------------------------------- #
# The reference network (byol/utils/networks.py, with today's Haiku)
# --------------------------------------------------------------------------- #


class ResNetTorso(hk.Module):
  """The reference's ResNetTorso (v1, bottleneck): named "res_net50" as its ResNet50."""

  def __init__(self, width, base):
    super().__init__(name="res_net50")
    bn = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)
    self.initial_conv = hk.Conv2D(base * width, 7, stride=2, with_bias=False, padding="SAME",
                                  name="initial_conv")
    self.initial_batchnorm = hk.BatchNorm(name="initial_batchnorm", **bn)
    self.block_groups = [
        hk.nets.ResNet.BlockGroup(channels=width * base * 4 * 2**i, num_blocks=n,
                                  stride=(1, 2, 2, 2)[i], bn_config=bn, resnet_v2=False,
                                  bottleneck=True, use_projection=True, name=f"block_group_{i}")
        for i, n in enumerate((3, 4, 6, 3))]

  def __call__(self, x, is_training):
    x = jax.nn.relu(self.initial_batchnorm(self.initial_conv(x), is_training))
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
    for group in self.block_groups:
      x = group(x, is_training, False)
    return jnp.mean(x, axis=(1, 2))


class MLP(hk.Module):
  """The reference's MLP: its layers get Haiku's default names (linear, batch_norm, linear_1)."""

  def __init__(self, name):
    super().__init__(name=name)

  def __call__(self, x, is_training):
    x = hk.Linear(HIDDEN)(x)
    x = hk.BatchNorm(True, True, decay_rate=0.9, eps=1e-5)(x, is_training)
    return hk.Linear(PROJ_DIM, with_bias=False)(jax.nn.relu(x))


def reference_network(width, base):
  def forward(images, is_training):
    images = networks.preprocess(images)  # the reference's normalize_images: same constants
    embedding = ResNetTorso(width, base)(images, is_training)
    projection = MLP("projector")(embedding, is_training)
    prediction = MLP("predictor")(projection, is_training)
    logits = hk.Linear(NUM_CLASSES, name="classifier")(jax.lax.stop_gradient(embedding))
    return dict(embedding=embedding, projection=projection, prediction=prediction,
                logits=logits)
  return hk.without_apply_rng(hk.transform_with_state(forward))


@functools.lru_cache(maxsize=None)
def reference(width=1, base=64):
  """(network, params, state): random weights, non-trivial BatchNorm statistics."""
  net = reference_network(width, base)
  params, state = random_init(net, 32, seed=width + base)
  rng = np.random.default_rng(base)
  statistic = lambda m, shape: (rng.uniform(0.5, 1.5, shape) if m.endswith("var_ema")
                                else rng.normal(0.0, 0.3, shape)).astype(np.float32)
  state = {m: {"counter": np.asarray(17, np.int32), "average": statistic(m, v["average"].shape),
               "hidden": np.zeros(v["hidden"].shape, np.float32)}
           for m, v in state.items()}
  params = jax.tree.map(np.asarray, params)
  return net, params, state


def images(seed, size):
  return np.random.default_rng(seed).uniform(size=(BATCH, size, size, 3)).astype(np.float32)


def model_config(width=1, base=64, padding="haiku_same", depth=50):
  config = base_config.get_base_config().model
  config.update(dict(depth=depth, width=width, base_channels=base, padding=padding,
                     projector_hidden=HIDDEN, predictor_hidden=HIDDEN, projection_dim=PROJ_DIM))
  return config


# --------------------------------------------------------------------------- #
# Writing a file as the reference did
# --------------------------------------------------------------------------- #


def _fake_module(monkeypatch, name, **attrs):
  module = types.ModuleType(name)
  for key, value in attrs.items():
    value.__module__ = name
    value.__qualname__ = key
    setattr(module, key, value)
  monkeypatch.setitem(sys.modules, name, module)
  return module


class FlatMapping(dict):
  """Haiku's 2020 mapping type, which pickled as FlatMapping(<dict>)."""

  def __reduce__(self):
    return FlatMapping, (dict(self),)


def write_released_file(path, params, state, monkeypatch, *, dill=True):
  """`params`/`state` (the online network's) pickled in the released files' structure.

  `dill`: classes and arrays as dill 0.3 wrote them; else as plain pickle does,
  naming the reference's NamedTuple classes themselves.
  """
  experiment_state = collections.namedtuple("_ByolExperimentState", STATE_FIELDS)
  lars_state = collections.namedtuple("ScaleByLarsState", ("mu",))
  decay_state = collections.namedtuple("AddWeightDecayState", ())
  if not dill:
    _fake_module(monkeypatch, "byol")
    _fake_module(monkeypatch, "byol.byol_experiment", _ByolExperimentState=experiment_state)
    _fake_module(monkeypatch, "byol.utils")
    _fake_module(monkeypatch, "byol.utils.optimizers", ScaleByLarsState=lars_state,
                 AddWeightDecayState=decay_state)

  def _create_namedtuple(name, fields, module):  # only its name goes into the file
    raise AssertionError("never called")

  def _create_array(f, args, state, npdict=None):
    raise AssertionError("never called")

  _fake_module(monkeypatch, "dill")
  _fake_module(monkeypatch, "dill._dill", _create_namedtuple=_create_namedtuple,
               _create_array=_create_array)
  import haiku._src.data_structures as data_structures  # pylint: disable=g-import-not-at-top
  FlatMapping.__module__ = data_structures.__name__
  monkeypatch.setattr(data_structures, "FlatMapping", FlatMapping, raising=False)

  class DillLikePickler(pickle.Pickler):
    def reducer_override(self, obj):
      if not dill:
        return NotImplemented
      if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
        module = "byol.byol_experiment" if obj is experiment_state else "byol.utils.optimizers"
        return _create_namedtuple, (obj.__name__, obj._fields, module)
      if type(obj) is np.ndarray:
        return (_create_array, (*obj.__reduce__(), None))
      return NotImplemented

  flat = lambda tree: FlatMapping({m: FlatMapping(v) for m, v in tree.items()})
  online_params, online_state = flat(params), flat(state)
  data = dict(
      experiment_state=experiment_state(
          online_params=online_params, target_params=online_params,
          online_state=online_state, target_state=online_state,
          opt_state=(decay_state(), lars_state(mu=online_params), decay_state())),
      step=4321, rng=np.asarray([0, 42], np.uint32))
  with open(path, "wb") as f:
    DillLikePickler(f, protocol=2).dump(data)
  # As numpy 1.x (which wrote the released files) names its reconstruction.
  raw = open(path, "rb").read().replace(b"cnumpy._core.multiarray\n",
                                        b"cnumpy.core.multiarray\n")
  with open(path, "wb") as f:
    f.write(raw)
  monkeypatch.undo()  # nothing of dill, the reference or the fake FlatMapping while loading
  return path


# --------------------------------------------------------------------------- #
# Import, then export
# --------------------------------------------------------------------------- #


def assert_import_and_export_exact(tmp_path, monkeypatch, width, base, sizes):
  net, params, state = reference(width, base)
  path = write_released_file(str(tmp_path / "pretrain.pkl"), params, state, monkeypatch)
  raw = open(path, "rb").read()
  assert b"dill._dill\n_create_namedtuple" in raw and b"numpy.core.multiarray" in raw
  assert b"haiku._src.data_structures\nFlatMapping" in raw
  assert "dill._dill" not in sys.modules and "byol.byol_experiment" not in sys.modules

  mc = model_config(width, base)
  imported = reference_checkpoint.import_file(path, mc)
  assert imported.step == 4321 and imported.num_classes == NUM_CLASSES
  assert {m.split("/")[0] for m in imported.params} == {
      "encoder", "projector", "predictor", "probe"}
  online = networks.make_networks(mc, NUM_CLASSES).online
  for seed, size in enumerate(sizes):
    x = images(seed, size)
    expected, _ = net.apply(params, state, x, False)
    got, _ = online.apply(imported.params, imported.state, x, False)
    for key in ("embedding", "projection", "prediction", "logits"):
      np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=ATOL, err_msg=key)
  # byol_jax's own padding gives other features: the comparison above can fail.
  symmetric = networks.make_networks(model_config(width, base, "torchvision"), NUM_CLASSES)
  other, _ = symmetric.online.apply(imported.params, imported.state, x, False)
  assert np.abs(other["embedding"] - expected["embedding"]).max() > 1e-2

  config = ml_collections.ConfigDict(dict(
      model=mc, export=dict(include_projector=True), data=dict(image_size=sizes[0])))
  paths = export.run_export(imported.params, imported.state, config, str(tmp_path / "export"))
  model = torch_resnet.load_safetensors(paths["safetensors"])
  with jax.enable_x64(True):
    params64, state64 = jax.tree.map(lambda a: np.asarray(a, np.float64), (params, state))
    for seed, size in enumerate(sizes):
      x = images(seed, size)
      expected, _ = net.apply(params64, state64, x.astype(np.float64), False)
      for key in ("embedding", "projection"):
        np.testing.assert_allclose(torch_eval(model, x, key, np.float64), expected[key],
                                   rtol=0, atol=TORCH_ATOL, err_msg=f"{key}, size {size}")


def test_resnet50_imports_and_exports_exactly(tmp_path, monkeypatch):
  assert_import_and_export_exact(tmp_path, monkeypatch, width=1, base=64, sizes=(64, 50))


def test_width2_resnet_imports_and_exports_exactly(tmp_path, monkeypatch):
  """The 200 2x file's mapping (width 2 multiplies the stem too) at depth 50, narrow."""
  assert_import_and_export_exact(tmp_path, monkeypatch, width=2, base=16, sizes=(50,))


def test_job_writes_a_checkpoint_that_load_pretrained_reads(tmp_path, monkeypatch):
  _, params, state = reference(2, 16)
  path = write_released_file(str(tmp_path / "r.pkl"), params, state, monkeypatch, dill=False)
  assert b"byol.byol_experiment\n_ByolExperimentState" in open(path, "rb").read()
  config = base_config.get_base_config()
  config.model.update(model_config(width=2, base=16).to_dict())
  config.import_path = path
  mesh = parallel.make_mesh()
  workdir = str(tmp_path / "w")
  result = import_reference.run(config, workdir, mesh)
  assert result["step"] == 4321
  loaded_config, _, loaded_params, loaded_state = checkpoint.load_pretrained(
      base_config.get_base_config(), workdir, mesh)
  assert loaded_config.model.padding == "haiku_same" and loaded_config.model.width == 2
  assert loaded_config.data.num_classes == NUM_CLASSES
  expected = reference_checkpoint.import_file(path, config.model)
  jax.tree.map(np.testing.assert_array_equal, (loaded_params, loaded_state),
               (expected.params, expected.state))
  # --job=export reads it as it reads a pretraining run.
  paths = export_job.run(base_config.get_base_config(), workdir, mesh)
  model = torch_resnet.load_safetensors(paths["safetensors"])
  assert model.byol_metadata["padding"] == "haiku_same" and model.conv1.out_channels == 32

  config.model.padding = "torchvision"
  with pytest.raises(ValueError, match=r"--config.model.padding=haiku_same"):
    import_reference.run(config, workdir, mesh)


def test_the_whole_state_imports_with_its_step(narrow_file):
  """`to_train_state` reads a released file's whole state: both networks, the LARS momentum
  (the file's `mu`) and the step, which lands where each schedule reads it."""
  path = narrow_file()
  data = reference_pickle.load(path)
  mc = model_config(base=16)
  optimizer = optim.make_optimizer(base_config.get_base_config())
  state = reference_checkpoint.to_train_state(data["experiment_state"], data["step"], mc,
                                              optimizer, rng=data["rng"])
  assert int(state.step) == 4321 == int(optax.tree_utils.tree_get(state.opt_state, "count"))
  counter = state.online_state["encoder/layer2_0/bn3/bn/~/mean_ema"]["counter"]
  assert counter.dtype == np.int32 and counter == 17  # each leaf keeps its own dtype
  np.testing.assert_array_equal(state.rng, [0, 42])
  online = reference_checkpoint.import_file(path, mc)
  # The file's target is its online network, its momentum the online params: the target's
  # predictor and classifier, which the reference's loss never reads, are left out.
  assert {m.split("/")[0] for m in state.target_params} == {"encoder", "projector"}
  jax.tree.map(np.testing.assert_array_equal,
               (state.online_params, state.online_state, optim.lars_momentum(state.opt_state),
                state.target_params, state.target_state),
               (online.params, online.state, online.params,
                networks.target_subset(online.params), networks.target_subset(online.state)))


def test_states_the_other_side_cannot_hold_are_named(narrow_file):
  es = reference_pickle.load(narrow_file())["experiment_state"]
  no_lars = reference_pickle.EXPERIMENT_STATE(*es[:4], (es.opt_state[0],))
  with pytest.raises(ValueError, match=r"opt_state holds no ScaleByLarsState"):
    reference_checkpoint.to_train_state(no_lars, 0, model_config(base=16), None, rng=[0, 0])
  group_norm = train_step.TrainState(
      step=0, rng=None, online_params={"encoder/bn1/gn": {"scale": np.ones(4)}},
      online_state={}, target_params={}, target_state={},
      opt_state=optax.TraceState(trace={}))
  with pytest.raises(ValueError) as err:
    reference_checkpoint.from_train_state(group_norm, model_config())
  assert str(err.value) == (
      "byol_jax's online params hold encoder/bn1/gn, which the reference's network has no "
      "place for: it builds BatchNorm ResNets with the ImageNet stem.")


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #


class _Payload:
  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "unimported"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, payload):
  marker = tmp_path / "marker"
  if payload == "os.system":
    obj = _Payload(os.system, f"touch {marker}")
  elif payload == "builtins.eval":
    obj = _Payload(eval, f"open({str(marker)!r}, 'w').close()")
  else:  # a global from a module that must not even be imported
    obj = _Payload(types.SimpleNamespace, 1)
  path = tmp_path / "evil.pkl"
  data = pickle.dumps(dict(experiment_state=[obj], step=1), protocol=2)
  if payload == "unimported":
    data = data.replace(b"ctypes\nSimpleNamespace\n", b"cnot_a_module_xyz\nboom\n")
  path.write_bytes(data)
  with pytest.raises(ValueError) as err:
    reference_checkpoint.import_file(str(path), model_config())
  message = str(err.value)
  assert "Refusing to load the pickled global" in message and "\n" not in message
  global_name = {"os.system": f"{os.system.__module__}.system", "builtins.eval": "builtins.eval",
                 "unimported": "not_a_module_xyz.boom"}[payload]
  assert global_name in message
  assert not marker.exists()
  assert "not_a_module_xyz" not in sys.modules


def test_object_arrays_are_refused(tmp_path):
  path = tmp_path / "objects.pkl"
  path.write_bytes(pickle.dumps(dict(experiment_state=np.array([None, 1], dtype=object)),
                                protocol=2))
  with pytest.raises(ValueError, match=r"Refusing an array of dtype object"):
    reference_pickle.load(str(path))


@pytest.fixture
def narrow_file(tmp_path, monkeypatch):
  """Writes the width-1 base-16 reference with `edit` applied to its (copied) params."""
  def write(edit=lambda params: None):
    _, params, state = reference(1, 16)
    params = {m: dict(v) for m, v in params.items()}
    edit(params)
    return write_released_file(str(tmp_path / "edited.pkl"), params, state, monkeypatch)
  return write


BLOCK = "res_net50/~/block_group_2/~/block_3/~/conv_1"


def test_a_missing_tensor_is_named(narrow_file):
  path = narrow_file(lambda p: p[BLOCK].pop("w"))
  with pytest.raises(ValueError) as err:
    reference_checkpoint.import_file(path, model_config(base=16))
  assert "encoder/layer3_3/conv2/w" in str(err.value) and "\n" not in str(err.value)


def test_a_misshaped_tensor_is_named(narrow_file):
  path = narrow_file(lambda p: p[BLOCK].update(w=np.zeros((3, 3, 64, 32), np.float32)))
  with pytest.raises(ValueError) as err:
    reference_checkpoint.import_file(path, model_config(base=16))
  message = str(err.value)
  assert f"{BLOCK}/w has shape (3, 3, 64, 32)" in message, message
  assert "encoder/layer3_3/conv2/w" in message and "(3, 3, 64, 64)" in message
  assert "\n" not in message


def test_wrong_model_config_says_what_to_pass(narrow_file):
  path = narrow_file()
  for wrong in (dict(depth=101), dict(width=2)):
    with pytest.raises(ValueError, match=r"holds a ResNet-50 \(res_net50\) with 16 stem channels"
                                         r".*--config.model.depth=50 --config.model.width=1\."):
      reference_checkpoint.import_file(path, model_config(base=16, **wrong))
  with pytest.raises(ValueError, match=r"model.padding is 'torchvision': pass "
                                       r"--config.model.padding=haiku_same"):
    reference_checkpoint.import_file("never_read.pkl", model_config(padding="torchvision"))


def test_plain_containers_of_protocol_2_load(tmp_path):
  """Python 2 names (__builtin__), bytes via _codecs, sets, complex numbers, numpy scalars."""
  data = dict(experiment_state=(b"", b"\x00\xff", {1, 2}, frozenset({3}), bytearray(b"x"),
                                1 + 2j, np.float32(1.5), collections.OrderedDict(a=1)))
  (tmp_path / "plain.pkl").write_bytes(pickle.dumps(data, protocol=2))
  assert reference_pickle.load(str(tmp_path / "plain.pkl")) == data
