"""The exported encoder computes, in plain PyTorch, what the Haiku encoder computes.

Each case builds the online network, runs a few training-mode forwards so the
BatchNorm moving statistics are far from their initial values, exports, loads
the export into `byol_jax.interop.torch_resnet` (torchvision's module tree and names)
with `strict=True`, and compares eval-mode embeddings on the same images
(JAX normalises them itself; torch gets them normalised as the export's
metadata says).

The comparison is made twice. In float64 on both sides (the exported float32
weights, evaluated in float64 by JAX, BatchNorm included, and by torch) it
isolates the export itself. A BatchNorm export is a lossless renaming and
transposition, so only the two frameworks' float64 summation orders differ:
observed up to 1e-12 (ResNet-50), held to F64_ATOL = 1e-10. A GroupNorm+WS export
folds the standardisation into its kernels and stores them in float32, a
rounding of up to 6e-8 relative per weight that the export really makes:
observed 4e-7 to 7e-7, held to F64_FOLDED_ATOL = 1e-5. Any misplaced or
mis-transposed tensor, or a padding mismatch, shows far above both. In float32,
as users will run it, the two frameworks round differently; for a randomly
initialised ResNet-50 in eval mode that alone reaches ~4e-4 on O(5) features
(torch float32 is as far from the float64 reference as JAX float32 is), hence
FP32_ATOL.
"""

import copy
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from byol_jax.configs import base  # noqa: E402
from byol_jax.interop import export, torch_resnet  # noqa: E402
from byol_jax.interop import torchvision_export as tv  # noqa: E402
from byol_jax.model import networks, resnet  # noqa: E402
from byol_jax.model.networks import IMAGE_MEAN, IMAGE_STD  # noqa: E402

torch.set_num_threads(2)
REPO = pathlib.Path(__file__).resolve().parents[1]

F64_ATOL = 1e-10        # float64 on both sides, BatchNorm: summation order only
F64_FOLDED_ATOL = 1e-5  # float64 on both sides, GroupNorm+WS: kernels folded, stored in float32
FP32_ATOL = 1e-3  # float32 on both sides: plus each framework's rounding (see above)
BATCH = 2
TRAIN_STEPS = 3
PROJ_HIDDEN, PROJ_DIM = 32, 16


def model_config(depth=18, width=1, stem="imagenet", norm="batch", base_channels=64,
                 padding="torchvision"):
  config = base.get_base_config().model
  config.update(dict(depth=depth, width=width, stem=stem, norm=norm, base_channels=base_channels,
                     padding=padding, projector_hidden=PROJ_HIDDEN, predictor_hidden=PROJ_HIDDEN,
                     projection_dim=PROJ_DIM))
  return config


def random_images(seed, size):
  """Random RGB images in [0, 1], NHWC float32, as the input pipeline makes them."""
  return np.random.default_rng(seed).uniform(size=(BATCH, size, size, 3)).astype(np.float32)


def random_init(online, size, seed):
  """Params with Haiku's tree structure but numpy random values, and Haiku's initial state.

  Haiku's own initialisers (threefry + truncated normal) take over 10 s for a width-2
  ResNet-18 on two CPU cores; numpy draws are instant. The values are also more
  telling: norm scales/offsets and linear biases are random, not 1 and 0, so a
  swapped or misplaced affine parameter or bias changes the outputs.
  """
  shapes = jax.eval_shape(lambda k, x: online.init(k, x, True), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32))
  param_shapes, state_shapes = shapes
  rng = np.random.default_rng(seed)
  normal = lambda shape, std: (std * rng.standard_normal(shape)).astype(np.float32)
  params = {}
  for module, leaves in param_shapes.items():
    params[module] = {}
    for name, leaf in leaves.items():
      shape = leaf.shape
      if name == "w" and len(shape) == 4:  # conv, HWIO: He normal on fan-out, as resnet.py
        value = normal(shape, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])))
      elif name == "w":  # linear, [in, out]
        value = normal(shape, np.sqrt(1.0 / shape[0]))
      elif name == "scale":
        value = 1.0 + normal(shape, 0.2)
      else:  # offsets and biases
        value = normal(shape, 0.1)
      params[module][name] = jnp.asarray(value)
  # The initial state is all zeros (EMA hidden/average values and counters).
  state = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), state_shapes)
  return params, state


@functools.lru_cache(maxsize=None)
def trained(depth=18, width=1, stem="imagenet", norm="batch", size=64, base_channels=64,
            padding="torchvision"):
  """(config, online transform, params, state) after a few training-mode forwards."""
  mc = model_config(depth, width, stem, norm, base_channels, padding)
  online = networks.make_networks(mc, num_classes=10).online
  params, state = random_init(online, size, seed=depth + width)
  train_forward = jax.jit(lambda p, s, x: online.apply(p, s, x, True)[1])
  for step in range(TRAIN_STEPS):
    state = train_forward(params, state, random_images(10 + step, size))
  return mc, online, params, state


def jax_eval(online, params, state, images, dtype=np.float32):
  """Eval-mode outputs of the online network, computed in `dtype`."""
  with jax.enable_x64(dtype == np.float64):
    cast = lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    outputs, _ = online.apply(jax.tree.map(cast, params), jax.tree.map(cast, state),
                              jnp.asarray(images, dtype), False)
    return {k: np.asarray(v) for k, v in outputs.items()}


def torch_eval(model, images, output="embedding", dtype=np.float32):
  """Eval-mode embedding (or projection, via `model.projector`) of NHWC [0, 1] `images`."""
  model = model.eval() if dtype == np.float32 else copy.deepcopy(model).double().eval()
  normalised = (images.astype(np.float64) - IMAGE_MEAN) / IMAGE_STD
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2), dtype=dtype))
    out = model(x)
    return (out if output == "embedding" else model.projector(out)).numpy()


def assert_matches_jax(model, online, params, state, images, output="embedding", folded=False):
  """`folded`: the export folded weight standardisation into float32 kernels (GroupNorm+WS)."""
  f64_atol = F64_FOLDED_ATOL if folded else F64_ATOL
  for dtype, atol in ((np.float64, f64_atol), (np.float32, FP32_ATOL)):
    expected = jax_eval(online, params, state, images, dtype)[output]
    np.testing.assert_allclose(torch_eval(model, images, output, dtype), expected, rtol=0,
                               atol=atol, err_msg=f"{output}, {dtype.__name__}, "
                               f"images {images.shape}")


def torch_state_dict(arrays):
  return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def torch_model(depth, **kwargs):
  return torch_resnet.resnet(*resnet.ARCHITECTURES[depth], **kwargs)


def documented_torch_model(mc):
  """The model `to_torchvision`'s docstring tells users to build, from torchvision's pieces.

  Width 1 uses the torchvision-shaped constructor as is, then the documented
  CIFAR-stem surgery; width > 1 needs torch_resnet's width argument.
  """
  kind, layers = resnet.ARCHITECTURES[mc.depth]
  block = torch_resnet.BasicBlock if kind == "basic" else torch_resnet.Bottleneck
  norm_layer = torch_resnet.group_norm if mc.norm == "group_ws" else None
  model = torch_resnet.ResNet(block, layers, width=mc.width, norm_layer=norm_layer,
                              num_classes=1000)
  model.fc = nn.Identity()  # the export has no classifier
  if mc.stem == "cifar":
    model.conv1 = nn.Conv2d(3, 64 * mc.width, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
  return model


CASES = [
    # (depth, width, stem, norm, image sizes): odd and even sizes catch padding asymmetry.
    pytest.param(18, 1, "imagenet", "batch", (64, 65), id="r18-imagenet-64-65"),
    pytest.param(50, 1, "imagenet", "batch", (64,), id="r50-imagenet-64"),
    pytest.param(18, 1, "cifar", "batch", (32,), id="r18-cifar-32"),
    pytest.param(18, 2, "imagenet", "batch", (33,), id="r18-width2-33"),
    pytest.param(18, 1, "imagenet", "group_ws", (65,), id="r18-gnws-65"),  # 64: below
]


@pytest.mark.parametrize("depth,width,stem,norm,sizes", CASES)
def test_torch_features_match_jax(depth, width, stem, norm, sizes):
  mc, online, params, state = trained(depth, width, stem, norm, sizes[0])
  model = documented_torch_model(mc)
  model.load_state_dict(torch_state_dict(tv.to_torchvision(params, state, mc)), strict=True)
  for seed, size in enumerate(sizes):
    images = random_images(100 + seed, size)
    assert torch_eval(model, images).shape == (BATCH, resnet.embedding_dim(depth, width))
    assert_matches_jax(model, online, params, state, images, folded=norm == "group_ws")


def test_group_ws_export_folds_standardisation():
  mc, _, params, state = trained(18, 1, "imagenet", "group_ws", 65)
  sd = tv.to_torchvision(params, state, mc)
  w = sd["layer1.0.conv1.weight"].astype(np.float64)  # OIHW: standardised per output channel
  np.testing.assert_allclose(w.mean(axis=(1, 2, 3)), 0, atol=1e-6)
  np.testing.assert_allclose(w.var(axis=(1, 2, 3)), 1, atol=1e-4)
  assert not any("running" in k or "num_batches" in k for k in sd)
  assert sd["bn1.weight"].shape == (64,) and "layer2.0.downsample.1.bias" in sd


@pytest.mark.parametrize("depth,num_keys", [(18, 120), (50, 318)])
def test_torchvision_key_names_and_shapes(depth, num_keys):
  # torchvision's resnet18 / resnet50 state dicts have 122 / 320 entries, of which
  # fc.weight and fc.bias are not exported.
  mc, _, params, state = trained(depth, 1, "imagenet", "batch", 64)
  sd = tv.to_torchvision(params, state, mc)
  assert len(sd) == num_keys
  assert not any(k.startswith("fc.") for k in sd)
  assert sd["conv1.weight"].shape == (64, 3, 7, 7)
  for name in ("weight", "bias", "running_mean", "running_var"):
    assert sd[f"bn1.{name}"].shape == (64,) and sd[f"bn1.{name}"].dtype == np.float32
  assert sd["bn1.num_batches_tracked"].dtype == np.int64
  assert sd["bn1.num_batches_tracked"].shape == ()
  assert int(sd["bn1.num_batches_tracked"]) == TRAIN_STEPS
  if depth == 18:
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "layer1.0.downsample.0.weight" not in sd
  else:
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3
    assert sd["layer4.2.bn3.running_var"].shape == (2048,)
  # Haiku's debiased moving statistics, not the zero-initialised ones.
  assert np.abs(sd["bn1.running_mean"]).max() > 1e-3
  assert not np.allclose(sd["bn1.running_var"], 1.0)


def test_projector_round_trip():
  mc, online, params, state = trained(18, 1, "cifar", "batch", 32)
  sd = tv.to_torchvision(params, state, mc, include_projector=True)
  assert {k for k in sd if k.startswith("projector.")} == {
      "projector.0.weight", "projector.0.bias", "projector.1.weight", "projector.1.bias",
      "projector.1.running_mean", "projector.1.running_var", "projector.1.num_batches_tracked",
      "projector.3.weight"}
  model = torch_model(18, stem="cifar")
  model.projector = torch_resnet.projector(512, PROJ_HIDDEN, PROJ_DIM)
  model.load_state_dict(torch_state_dict(sd), strict=True)
  images = random_images(7, 32)
  assert_matches_jax(model, online, params, state, images, "embedding")
  assert_matches_jax(model, online, params, state, images, "projection")


def test_npz_round_trip(tmp_path):
  mc, _, params, state = trained(18, 1, "cifar", "batch", 32)
  for include_projector in (False, True):
    path = str(tmp_path / f"export_{include_projector}.npz")
    assert export.export_npz(params, state, path, include_projector=include_projector) == path
    flat = export.load_npz(path)
    assert all(v.dtype == np.float32 for v in flat.values())
    assert not any(k.startswith(("predictor", "probe")) for k in flat)
    assert any(k.startswith("projector/") for k in flat) == include_projector
    np.testing.assert_array_equal(flat["encoder/conv1/w"], params["encoder/conv1"]["w"])
    np.testing.assert_array_equal(flat["encoder/layer2_0/downsample_norm/bn/offset"],
                                  params["encoder/layer2_0/downsample_norm/bn"]["offset"])
    np.testing.assert_array_equal(flat["encoder/layer1_0/bn1/bn/mean"],
                                  state["encoder/layer1_0/bn1/bn/~/mean_ema"]["average"])
    np.testing.assert_array_equal(flat["encoder/bn1/bn/var"],
                                  state["encoder/bn1/bn/~/var_ema"]["average"])
    # Every parameter is there, under "<module>/<name>", and nothing else but the statistics.
    prefixes = ("encoder/", "projector/") if include_projector else ("encoder/",)
    expected = {f"{m}/{n}" for m in params for n in params[m] if m.startswith(prefixes)}
    expected |= {m.replace("/~/mean_ema", "/mean").replace("/~/var_ema", "/var")
                 for m in state if m.startswith(prefixes)}
    assert set(flat) == expected
    for key in expected:
      module, name = key.rsplit("/", 1)
      if name in ("mean", "var"):
        value = state[f"{module}/~/{name}_ema"]["average"]
      else:
        value = params[module][name]
      np.testing.assert_array_equal(flat[key], np.asarray(value), err_msg=key)
  assert sorted(os.listdir(tmp_path)) == ["export_False.npz", "export_True.npz"]  # no temp files


def test_run_export_files_load_in_torch(tmp_path):
  from safetensors.torch import load_file

  mc, online, params, state = trained(18, 2, "imagenet", "batch", 33)
  config = ml_collections.ConfigDict(dict(
      model=mc, export=dict(include_projector=True), data=dict(image_size=33)))
  paths = export.run_export(params, state, config, str(tmp_path / "export"))
  assert paths == {"npz": str(tmp_path / "export" / "encoder.npz"),
                   "safetensors": str(tmp_path / "export" / "encoder_torchvision.safetensors"),
                   "json": str(tmp_path / "export" / "export.json")}
  assert sorted(os.listdir(tmp_path / "export")) == sorted(os.path.basename(p)
                                                           for p in paths.values())

  info = json.loads((tmp_path / "export" / "export.json").read_text())
  assert info["architecture"] == "resnet18_2x" and info["embedding_dim"] == 1024
  assert info["input_size"] == 33 and info["includes_projector"] is True
  assert info["projection_dim"] == PROJ_DIM
  assert info["input_normalization"]["mean"] == list(IMAGE_MEAN)
  assert info["input_normalization"]["std"] == list(IMAGE_STD)
  assert info["files"]["npz"]["num_arrays"] == len(export.load_npz(paths["npz"]))

  images = random_images(5, 33)
  model = torch_model(18, width=2)
  model.projector = torch_resnet.projector(1024, PROJ_HIDDEN, PROJ_DIM)
  model.load_state_dict(load_file(paths["safetensors"]), strict=True)
  assert_matches_jax(model, online, params, state, images)

  # The metadata alone is enough to rebuild the model.
  loaded = torch_resnet.load_safetensors(paths["safetensors"])
  assert loaded.byol_metadata["architecture"] == "resnet18_2x"
  assert loaded.byol_metadata["input_mean"] == list(IMAGE_MEAN)
  assert loaded.byol_metadata["stem"] == "imagenet" and loaded.byol_metadata["width"] == "2"
  assert_matches_jax(loaded, online, params, state, images, "projection")


@pytest.mark.parametrize("norm", ["batch", "group_ws"])
def test_narrow_demo_net_round_trips_through_metadata(tmp_path, norm):
  """base_channels < 64 (the CPU demo nets; GroupNorm then has fewer groups) exports exactly."""
  mc, online, params, state = trained(18, 1, "cifar", norm, 32, base_channels=16)
  config = ml_collections.ConfigDict(dict(
      model=mc, export=dict(include_projector=False), data=dict(image_size=32)))
  paths = export.run_export(params, state, config, str(tmp_path))
  info = json.loads((tmp_path / "export.json").read_text())
  assert info["architecture"] == "resnet18_base16" and info["embedding_dim"] == 128
  loaded = torch_resnet.load_safetensors(paths["safetensors"])
  assert loaded.conv1.out_channels == 16
  if norm == "group_ws":  # min(32, C) groups, as resnet.Norm, not a fixed 32
    assert loaded.bn1.num_groups == 16 and loaded.layer4[0].bn2.num_groups == 32
    assert loaded.byol_metadata["torch_norm_layer"].startswith("GroupNorm(min(32, C), C")
  assert_matches_jax(loaded, online, params, state, random_images(7, 32),
                     folded=norm == "group_ws")


def test_safetensors_without_projector(tmp_path):
  from safetensors.torch import load_file

  mc, online, params, state = trained(18, 1, "imagenet", "group_ws", 65)
  path = str(tmp_path / "gn.safetensors")
  tv.save_torchvision_safetensors(params, state, mc, path)
  tensors = load_file(path)
  assert not any(k.startswith("projector.") for k in tensors)
  model = documented_torch_model(mc)
  model.load_state_dict(tensors, strict=True)
  assert_matches_jax(model, online, params, state, random_images(9, 64), folded=True)
  assert sorted(os.listdir(tmp_path)) == ["gn.safetensors"]


def test_errors_say_what_to_fix():
  mc, _, params, state = trained(18, 1, "cifar", "batch", 32)
  with pytest.raises(ValueError,
                     match=r"depth 26.*model.depth must be one of \[18, 34, 50, 101, 152, 200\]"):
    tv.to_torchvision(params, state, model_config(depth=26))
  with pytest.raises(ValueError, match=r"stem 'tiny'.*model.stem must be one of"):
    tv.to_torchvision(params, state, model_config(stem="tiny"))
  with pytest.raises(ValueError, match=r"width 0.*model.width must be an integer in 1..4"):
    tv.to_torchvision(params, state, model_config(width=0))
  with pytest.raises(ValueError, match=r"do not match model config \(depth=34.*trained with"):
    tv.to_torchvision(params, state, model_config(depth=34, stem="cifar"))
  with pytest.raises(ValueError, match=r"conv1/w has shape \(3, 3, 3, 64\).*\(7, 7, 3, 64\)"):
    tv.to_torchvision(params, state, model_config(stem="imagenet"))
  with pytest.raises(ValueError, match=r"no encoder BatchNorm statistics.*online state"):
    tv.to_torchvision(params, {}, model_config(stem="cifar"))
  encoder_only = networks.encoder_subset(params)
  with pytest.raises(ValueError, match=r"no 'projector' modules.*include_projector=False"):
    tv.to_torchvision(encoder_only, state, model_config(stem="cifar"), include_projector=True)
  with pytest.raises(ValueError, match=r"no 'projector' modules"):
    export.flatten_for_npz(encoder_only, state, include_projector=True)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
  mc, _, params, state = trained(18, 1, "cifar", "batch", 32)
  path = str(tmp_path / "encoder.npz")
  export.export_npz(params, state, path)
  before = (tmp_path / "encoder.npz").read_bytes()

  def interrupted_savez(f, **arrays):
    f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(export.np, "savez", interrupted_savez)
  with pytest.raises(OSError, match="disk full"):
    export.export_npz(params, state, path)
  assert (tmp_path / "encoder.npz").read_bytes() == before
  assert os.listdir(tmp_path) == ["encoder.npz"]  # the temporary file is gone too


@pytest.mark.parametrize("depth", [18, 50])
def test_layout_is_what_the_network_builds(depth):
  blocks = resnet.layout(depth, width=2, base_channels=16)
  mc = model_config(depth, width=2, base_channels=16)
  encoder = networks.make_networks(mc, num_classes=1).encoder
  params, _ = jax.eval_shape(lambda x: encoder.init(jax.random.PRNGKey(0), x, True),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  names = {m.split("/")[1] for m in params if m.startswith("encoder/layer")}
  assert sorted(b.name for b in blocks) == sorted(names)
  last_conv = "conv2" if resnet.ARCHITECTURES[depth][0] == "basic" else "conv3"
  for b in blocks:
    assert params[f"encoder/{b.name}/conv1"]["w"].shape[2] == b.in_channels, b
    assert params[f"encoder/{b.name}/conv2"]["w"].shape[:2] == (3, 3), b  # the strided conv
    assert params[f"encoder/{b.name}/conv2"]["w"].shape[3] == b.channels, b
    assert params[f"encoder/{b.name}/{last_conv}"]["w"].shape[3] == b.out_channels, b
    assert (f"encoder/{b.name}/downsample_conv" in params) == b.downsample, b
  # torchvision's layout: stride 2 at the first block of layers 2-4; a projection
  # shortcut wherever the shape changes (also layer1.0 of a bottleneck net).
  assert [b.name for b in blocks if b.stride == 2] == ["layer2_0", "layer3_0", "layer4_0"]
  first = ["layer1_0"] if depth == 50 else []
  assert [b.name for b in blocks if b.downsample] == first + ["layer2_0", "layer3_0", "layer4_0"]
  assert resnet.embedding_dim(depth, 2, 16) == (1024 if depth == 50 else 256)


def test_haiku_same_padding_round_trips(tmp_path):
  """padding="haiku_same" (DeepMind's weights): Haiku's asymmetric stride-2 padding, and a
  PyTorch model rebuilt from the file's metadata pads the same way, at even and odd sizes."""
  mc, online, params, state = trained(18, 1, "imagenet", "batch", 64, padding="haiku_same")
  config = ml_collections.ConfigDict(dict(
      model=mc, export=dict(include_projector=True), data=dict(image_size=64)))
  paths = export.run_export(params, state, config, str(tmp_path))
  loaded = torch_resnet.load_safetensors(paths["safetensors"])
  assert loaded.byol_metadata["padding"] == "haiku_same"
  assert json.loads((tmp_path / "export.json").read_text())["padding"] == "haiku_same"
  for seed, size in enumerate((64, 65, 70)):  # even, odd, and even-then-odd feature maps
    assert_matches_jax(loaded, online, params, state, random_images(20 + seed, size))
  assert_matches_jax(loaded, online, params, state, random_images(30, 64), "projection")
  # The padding matters: torchvision's symmetric padding gives other features.
  symmetric = torch_model(18)
  symmetric.load_state_dict(torch_state_dict(tv.to_torchvision(params, state, mc)), strict=True)
  images = random_images(40, 64)
  assert np.abs(torch_eval(symmetric, images) - torch_eval(loaded, images)).max() > 1e-2


def test_torch_side_agrees_with_resnet_without_importing_jax():
  assert torch_resnet.PADDINGS == resnet.PADDINGS and torch_resnet.NORMS == resnet.NORMS
  assert set(torch_resnet.BLOCKS) == {kind for kind, _ in resnet.ARCHITECTURES.values()}
  with pytest.raises(ValueError, match=r"Unknown padding 'valid'"):
    torch_model(18, padding="valid")
  code = ("import sys, byol_jax.interop.torch_resnet as t; t.resnet('basic', (2, 2, 2, 2)); "
          "assert 'jax' not in sys.modules, 'torch_resnet imported jax'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
