"""The benchmark scripts run end to end with tiny settings and print well-formed figures.

Each script runs as a subprocess, as a person would run it; only the shape and
sanity of its output are checked, never a timing.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from byol_jax.preflight import gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _env(host_devices=None):
  """The test session's environment without its 8-device XLA flag (or with another count)."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  if host_devices:
    flags += f" --xla_force_host_platform_device_count={host_devices}"
  env["XLA_FLAGS"] = flags.strip()
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _run(script, *args, host_devices=None, timeout=900):
  result = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=_env(host_devices))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------
# bench_step.py
# ----------------------------------------------------------------------------

TINY_STEP = ("--config=demo", "--batch_size=8", "--image_size=16", "--base_channels=4",
             "--seconds=0.2", "--repeats=2", "--peak_seconds=0.1")


def _run_streaming(script, *args):
  """Runs a script; also returns whether it was still running when its first line came."""
  process = subprocess.Popen([sys.executable, os.path.join(BENCH, script), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO, env=_env())
  first = process.stdout.readline()
  running_at_first_line = process.poll() is None
  rest, stderr = process.communicate(timeout=900)
  assert process.returncode == 0, (first + rest)[-3000:] + stderr[-3000:]
  return first + rest, running_at_first_line


@pytest.fixture(scope="module")
def step_figures(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_step")
  figures = {}
  for devices in (1, 2):
    path = out / f"d{devices}.json"
    stdout, streamed = _run_streaming("bench_step.py", *TINY_STEP, f"--devices={devices}",
                                      f"--json={path}")
    figures[devices] = (json.loads(path.read_text()), stdout, streamed)
  return figures


def test_bench_step_prints_and_writes_every_figure(step_figures):
  figures, stdout, streamed = step_figures[1]
  assert streamed, "figures must be printed as they are measured, not all at the end"
  for key in ("train_compile_s", "train_step_s", "train_images_per_s", "train_step_gflop_xla",
              "encoder_forward_gflop_per_image", "online_forward_gflop_per_image",
              "train_achieved_gflop_per_s", "eval_images_per_s", "eval_achieved_gflop_per_s",
              "matmul_peak_gflop_per_s", "peak_host_memory_mib", "train_images_per_cpu_s",
              "eval_images_per_cpu_s", "matmul_peak_gflop_per_cpu_s", "train_step_gflop_jaxpr",
              "augment_color_s", "augment_s", "augment_share_of_step"):
    assert _positive(figures[key]), (key, figures[key])
    assert re.search(rf"^{key}\s+\S+$", stdout, re.M), key  # one "name  value" line each
  assert figures["augment_crop_s"] == 0.0  # host views: no crop in the step
  assert figures["input"] == "views" and figures["augment"] is True
  assert figures["batch_size"] == 8 and figures["image_size"] == 16
  assert figures["devices"] == 1 and figures["base_channels"] == 4
  assert 0 < figures["train_fraction_of_matmul_peak"]
  assert 0 < figures["train_fraction_of_matmul_peak_per_cpu_s"]
  assert (figures["train_images_per_s_slowest_window"] <= figures["train_images_per_s"]
          <= figures["train_images_per_s_fastest_window"])
  # images/s and seconds per step are two views of one measurement
  assert figures["train_images_per_s"] == pytest.approx(8 / figures["train_step_s"])
  # The online network is the encoder plus small heads.
  assert figures["online_forward_gflop_per_image"] > figures["encoder_forward_gflop_per_image"]
  # A BYOL step is ~8 forwards per example (XLA skips padded taps, so a bit under).
  assert 0.4 < figures["train_flops_over_8x_forward"] < 2.0


def test_bench_step_counts_the_whole_step_on_several_devices(step_figures):
  one, two = step_figures[1][0], step_figures[2][0]
  assert two["devices"] == 2 and two["host_devices"] == 2
  # Per-device cost x devices: the same work, whatever the mesh (collectives aside).
  assert two["train_step_gflop_xla"] == pytest.approx(one["train_step_gflop_xla"], rel=0.1)


def test_jaxpr_flop_count_matches_shape_arithmetic():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bench_step = _load("bench_step")

  def net(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.jit(lambda y: y.reshape(y.shape[0], -1) @ m)(y)  # nested jit is counted too

  x, w, m = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((4 * 4 * 5, 7))
  flops = bench_step.jaxpr_matmul_flops(jax.make_jaxpr(net)(x, w, m).jaxpr)
  assert flops == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3) + 2 * (2 * 7) * (4 * 4 * 5)


# ----------------------------------------------------------------------------
# bench_reference_step.py
# ----------------------------------------------------------------------------

# A stand-in for deepmind-research's byol/ (not available to CI): the same
# interface and the same dependencies the shims must cover (jax.tree_map, acme,
# dill), and a pmapped step with a cross-device mean, like the reference's.
_STAND_IN = {
    "byol/__init__.py": "",
    "byol/configs/__init__.py": "",
    "byol/utils/__init__.py": "",
    "byol/configs/byol.py": """
def get_config(num_epochs, batch_size):
  return dict(batch_size=batch_size, max_steps=num_epochs,
              network_config=dict(encoder_class="ResNet50"),
              checkpointing_config=dict(checkpoint_dir="/nonexistent"))
""",
    "byol/utils/augmentations.py": """
import jax
def postprocess(inputs, rng):
  noise = jax.random.uniform(rng, inputs["view1"].shape)
  return dict(view1=inputs["view1"] * noise, view2=inputs["view2"], labels=inputs["labels"])
""",
    "byol/byol_experiment.py": """
from acme.jax import utils as acme_utils
import dill
import jax
import jax.numpy as jnp
from byol.utils import augmentations

class ByolExperiment:
  def __init__(self, batch_size, max_steps, network_config, checkpointing_config):
    assert checkpointing_config["checkpoint_dir"] != "/nonexistent"
    self.update_pmap = jax.pmap(self._update_fn, axis_name="i")

  def _make_initial_state(self, rng, dummy_input):
    return {"w": jax.random.normal(rng, (dummy_input["view1"].shape[-1], 4))}

  def _update_fn(self, state, global_step, rng, inputs):
    views = augmentations.postprocess(inputs, rng)
    grads = jax.grad(lambda s: jnp.mean((views["view1"] @ s["w"]) ** 2))(state)
    grads = jax.tree_map(lambda g: jax.lax.pmean(g, "i"), grads)
    return jax.tree_map(lambda w, g: w - 0.1 * g, state, grads), {"step": global_step}
""",
}


def _write_stand_in(folder):
  for name, text in _STAND_IN.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_bench_reference_step_runs_a_reference_step_and_prints_figures(tmp_path):
  _write_stand_in(tmp_path)
  path = tmp_path / "ref.json"
  stdout = _run("bench_reference_step.py", f"--reference_dir={tmp_path}", "--batch_size=4",
                "--image_size=8", "--steps=2", f"--json={path}", host_devices=2)
  figures = json.loads(path.read_text())
  assert figures["devices"] == 2 and figures["batch_size"] == 4
  for key in ("train_compile_s", "train_step_s", "train_cpu_s_per_step", "train_images_per_s",
              "train_step_gflop_xla", "augment_s", "augment_share_of_step"):
    assert _positive(figures[key]), (key, figures[key])
    assert re.search(rf"^{key}\s+\S+$", stdout, re.M), key
  assert figures["train_images_per_s"] == pytest.approx(4 / figures["train_step_s"])


def test_bench_reference_step_names_a_batch_that_does_not_split(tmp_path):
  _write_stand_in(tmp_path)
  result = subprocess.run([sys.executable, os.path.join(BENCH, "bench_reference_step.py"),
                           f"--reference_dir={tmp_path}", "--batch_size=3"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=_env(host_devices=2))
  assert result.returncode != 0
  assert "--batch_size=3 does not split over 2 devices" in result.stderr


def test_bench_reference_step_names_a_wrong_reference_dir(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(BENCH, "bench_reference_step.py"),
                           f"--reference_dir={tmp_path}"], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=_env())
  assert result.returncode != 0
  assert "no byol/byol_experiment.py" in result.stderr


# ----------------------------------------------------------------------------
# cpu_budget_quality.py
# ----------------------------------------------------------------------------

def test_cpu_budget_quality_tiny_run(shared_cifar10, tmp_path):
  path = tmp_path / "quality.json"
  stdout = _run("cpu_budget_quality.py", "--budget=tiny", f"--json={path}",
                f"--data={shared_cifar10 / 'cifar10_jpeg.zip'}")
  report = json.loads(path.read_text())
  assert report["settings"]["steps"] == 2 and report["settings"]["base_channels"] == 4
  results = report["results"]
  for name in ("byol", "random", "no_predictor"):
    r = results[name]
    assert r["finite"], name
    for key in ("knn_top1", "knn_top5", "probe_top1"):
      assert 0.0 <= r[key] <= 1.0, (name, key)
    assert r["num_train_features"] == 128 and r["num_test_features"] == 128
    assert r["projection_spread"] >= 0.0
    assert re.search(rf"^{name}\s+[01]\.\d{{4}}\s+[01]\.\d{{4}}\s+\d+\.\d{{3}}$", stdout, re.M)
  assert "random_init_state" in results  # reported, finite or not
  for other in ("random", "no_predictor"):
    for metric in ("knn_top1", "probe_top1"):
      gap = report["gaps"][f"byol_minus_{other}_{metric}"]
      assert gap == pytest.approx(results["byol"][metric] - results[other][metric])
      assert re.search(rf"gap byol_minus_{other}_{metric}: [+-]\d+\.\d\d points", stdout)
  for variant in ("byol", "no_predictor"):
    assert math.isfinite(report["pretrain"][variant]["byol_loss"])
  assert report["seconds"]["total"] > 0 and len(report["load_average_start"]) == 3


def test_cpu_budget_quality_ablation_configs():
  bench = _load("cpu_budget_quality")
  _, settings, variants = bench.parse_args(["--mode=ablations"])
  assert settings["augment_style"] == "reference"
  assert set(variants) == set(bench.MODES["ablations"]) - {"reference_style"}  # the budget's
  _, settings, variants = bench.parse_args(["--mode=ablations", "--augment_style=torchvision"])
  assert set(variants) == set(bench.MODES["ablations"]) - {"torchvision_style"}
  config = bench.make_config(settings, "unused.zip", 0, "reference_style")
  assert config.augment.style == "reference"
  assert bench.make_config(settings, "unused.zip", 0, "byol").augment.style == "torchvision"
  config = bench.make_config(bench.BUDGETS["tiny"], "unused.zip", 0, "tau_zero")
  assert config.base_tau == 0.0 and config.tau_schedule == "constant"
  config = bench.make_config(bench.BUDGETS["tiny"], "unused.zip", 0, "no_head_bn")
  assert config.model.head_norm is False
  config = bench.make_config(bench.BUDGETS["tiny"], "unused.zip", 0, "gn_ws_no_head_bn")
  assert config.model.norm == "group_ws" and config.model.head_norm is False
  config = bench.make_config(bench.BUDGETS["tiny"], "unused.zip", 0, "torchvision_style")
  assert config.augment.style == "torchvision"


def test_cpu_budget_quality_views_mode_swaps_one_part_of_the_reference_views():
  from byol_jax.configs import base  # pylint: disable=g-import-not-at-top
  bench = _load("cpu_budget_quality")
  _, settings, variants = bench.parse_args(["--mode=views"])
  assert settings["augment_style"] == "reference" and settings["steps"] == 400
  reference = base.AUGMENT_STYLES["reference"]
  swapped = {}
  for variant in variants:
    parts = base.resolve_augment(bench.make_config(settings, "unused.zip", 0, variant).augment)
    swapped[variant] = {k for k in parts if parts[k] != reference[k]}
  assert swapped == {"byol": set(), "reference_inception_crop": {"crop"},
                     "reference_torchvision_color": {"color"},
                     "reference_bilinear_resize": {"resize"},
                     "torchvision_style": {"crop", "color", "resize"}}


def test_cpu_budget_quality_rejects_unknown_variants():
  bench = _load("cpu_budget_quality")
  with pytest.raises(SystemExit):
    bench.parse_args(["--variants=byol,simclr"])


# ----------------------------------------------------------------------------
# bench_input.py
# ----------------------------------------------------------------------------

def test_bench_input_tiny_run(shared_cifar10):
  stdout = _run("bench_input.py", f"--cifar_zip={shared_cifar10 / 'cifar10_jpeg.zip'}",
                "--sizes=32,224", "--batches=2", "--batch32=16", "--batch224=4",
                "--num_jpegs=8", "--skip=micro,pil")
  rates = re.findall(r"host pipeline .*?: ([\d,]+) two-view images per CPU-second", stdout)
  assert len(rates) == 2 and all(int(r.replace(",", "")) > 0 for r in rates)
  assert len(re.findall(r"colour ops in JAX .*?: [\d.]+ ms per batch", stdout)) == 2
  assert re.search(r"load average: [\d.]+", stdout)


# ----------------------------------------------------------------------------
# accelerator_run.py
# ----------------------------------------------------------------------------

def test_accelerator_run_tiny_cpu_mode(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / "tiny.npz"
  np.savez(data, train_images=rng.integers(0, 256, (64, 20, 20, 3), np.uint8),
           train_labels=np.arange(64) % 4, test_images=rng.integers(0, 256, (32, 20, 20, 3),
                                                                    np.uint8),
           test_labels=np.arange(32) % 4)
  env = _env()
  env["OUT"] = str(tmp_path / "out")
  result = subprocess.run([sys.executable, os.path.join(BENCH, "accelerator_run.py"), "--tiny",
                           f"--data={data}"], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads((tmp_path / "out" / "accelerator_run.json").read_text())
  assert not report["errors"]
  stages = report["stages"]
  assert stages["device"]["platform"] == "cpu" and not stages["device"]["tensorflow_loaded"]
  assert _positive(stages["bf16_matmul_peak"]["tflop_per_s"])
  step = stages["tiny_arrays_b8"]
  for key in ("compile_s", "images_per_s", "step_tflop_xla", "mfu", "augment_crop_s",
              "augment_color_s", "augment_share_of_step"):
    assert _positive(step[key]), key
  assert stages["tiny_largest_planned"]["batch_size"] == 16
  pretrain = stages["pretrain_resnet18_cifar10"]
  assert pretrain["steps"] == 6 and math.isfinite(pretrain["byol_loss_last"])
  for key in ("knn_top1_random_init", "knn_top1_pretrained"):
    assert 0.0 <= pretrain[key] <= 1.0
  assert re.search(r"kNN top-1 [\d.]+ at init -> [\d.]+", result.stdout)
  ops = stages["ops"]
  for key in ("pointwise_total_conv_ms", "pointwise_total_matmul_ms", "pointwise_speedup",
              "max_pool_reduce_window_ms", "max_pool_nine_slices_ms"):
    assert _positive(ops[key]), key


def test_bench_ops_finds_every_pointwise_conv_of_resnet50():
  ops = _load("bench_ops")
  found = ops.pointwise_convs(ops.parse_args([]))
  # 16 bottlenecks with two 1x1 convs each, and 4 projection shortcuts.
  assert sum(found.values()) == 36
  assert found[(56, 64, 64, 1)] == 1            # layer1_0's first conv, on the stem's 64
  assert found[(56, 256, 64, 1)] == 2           # layer1_1 and layer1_2
  assert found[(56, 256, 512, 2)] == 1          # layer2_0's strided shortcut
  assert found[(7, 512, 2048, 1)] == 3          # every layer4 block's last conv


def test_accelerator_run_checks_the_preflight_only_on_a_known_gpu(tmp_path):
  """On a GPU of preflight/gpu.py's table it compiles the first case deviceless beside the
  measurement (a lent GPU runs that); any other device records why it did not."""
  run = _load("accelerator_run")
  figures = run.preflight_check({"batch_size": 256, "image_size": 224}, str(tmp_path))
  assert figures == {"skipped": "cpu is not in preflight/gpu.py's table"}
  assert gpu.by_device_kind("NVIDIA H100 80GB HBM3") == "h100"


def test_accelerator_run_plans_the_largest_batch_from_xla_memory():
  run = _load("accelerator_run")
  # 2 GiB of parameters and optimiser state, 50 MiB of temporaries per example, 80 GiB free.
  measured = dict(batch_size=256, step_xla_argument_mib=1024, step_xla_output_mib=1024,
                  step_xla_temp_mib=256 * 50, device_bytes_limit_gib=80.0)
  batch = run.largest_batch(measured)
  assert batch % 64 == 0
  assert batch == (80 * 1024 * run.MEMORY_HEADROOM - 2048) // 50 // 64 * 64
  assert run.largest_batch({"batch_size": 8}) == 16  # no memory figures: double


# ----------------------------------------------------------------------------
# reference_parity.py
# ----------------------------------------------------------------------------

# A stand-in for deepmind-research's byol/ with the interface reference_parity.py uses:
# configs/byol.py and configs/eval.py, ByolExperiment and EvalExperiment under jax.pmap, the
# augmentations.postprocess above (noise: it must be bypassed), and a BYOL step written from
# the paper's definition in the reference's layout: a ResNet-18 torso of Haiku block groups
# (4 stem channels; shortcuts where byol_jax's ResNet-18 has them, for a fast test), MLP heads
# with Haiku's default names, cross-replica BatchNorm, LARS as decay -> trust ratio ->
# momentum -> lr without biases and norms, the EMA after the update.
_PARITY_STAND_IN = {
    **{k: v for k, v in _STAND_IN.items() if k.endswith(("__init__.py", "augmentations.py"))},
    "byol/configs/byol.py": """
def get_config(num_epochs, batch_size):
  return dict(
      random_seed=0, num_classes=10, batch_size=batch_size, base_target_ema=0.99,
      max_steps=num_epochs * 64 // batch_size,
      network_config=dict(
          projector_hidden_size=32, projector_output_size=16, predictor_hidden_size=32,
          encoder_class="ResNet18", encoder_config=dict(resnet_v2=False, width_multiplier=1),
          bn_config=dict(decay_rate=0.9, eps=1e-5, cross_replica_axis="i", create_scale=True,
                         create_offset=True)),
      optimizer_config=dict(weight_decay=1e-3, eta=1e-3, momentum=0.9),
      lr_schedule_config=dict(base_learning_rate=0.3, warmup_steps=10 * 64 // batch_size),
      checkpointing_config=dict(checkpoint_dir="/nonexistent"))
""",
    "byol/configs/eval.py": """
def get_config(checkpoint_to_evaluate, batch_size):
  return dict(
      random_seed=0, num_classes=10, batch_size=batch_size, max_steps=80 * 64 // batch_size,
      network_config=dict(encoder_class="ResNet50", encoder_config={}, bn_decay_rate=0.9),
      optimizer_config=dict(momentum=0.9, nesterov=True),
      lr_schedule_config=dict(base_learning_rate=0.2, warmup_steps=0),
      checkpointing_config=dict(checkpoint_dir="/nonexistent"))
""",
    "byol/utils/networks.py": """
import haiku as hk
import jax
import jax.numpy as jnp

class ResNet18(hk.Module):  # its modules made in __init__, hence "res_net18/~/..."
  def __init__(self, num_classes=None, bn_config=None, resnet_v2=False, width_multiplier=1):
    super().__init__()
    bn = dict(dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True),
              **bn_config)
    self.conv = hk.Conv2D(4 * width_multiplier, 7, stride=2, with_bias=False,
                          name="initial_conv")
    self.bn = hk.BatchNorm(name="initial_batchnorm", **bn)
    self.groups = [hk.nets.ResNet.BlockGroup(
        channels=4 * width_multiplier * 2**i, num_blocks=2, stride=(1, 2, 2, 2)[i],
        bn_config=bn, resnet_v2=False, bottleneck=False, use_projection=i > 0,
        name=f"block_group_{i}") for i in range(4)]

  def __call__(self, x, is_training):
    x = (x - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])
    x = jax.nn.relu(self.bn(self.conv(x), is_training))
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
    for group in self.groups:
      x = group(x, is_training, False)
    return jnp.mean(x, axis=(1, 2))

class MLP(hk.Module):
  def __init__(self, name, hidden_size, output_size, bn_config):
    super().__init__(name=name)
    self.hidden, self.output, self.bn = hidden_size, output_size, bn_config

  def __call__(self, x, is_training):
    x = hk.BatchNorm(**self.bn)(hk.Linear(self.hidden)(x), is_training)
    return hk.Linear(self.output, with_bias=False)(jax.nn.relu(x))

def cosine(step, total, peak):
  return peak * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step, total) / total))

def cross_entropy(logits, labels, num_classes):
  return -jnp.mean(jnp.sum(jax.nn.one_hot(labels, num_classes) * jax.nn.log_softmax(logits), -1))
""",
    "byol/byol_experiment.py": """
import collections
from acme.jax import utils as acme_utils
import dill
import haiku as hk
import jax
import jax.numpy as jnp
import optax
from byol.utils import augmentations, networks

_ByolExperimentState = collections.namedtuple(
    "_ByolExperimentState", "online_params target_params online_state target_state opt_state")
ScaleByLarsState = collections.namedtuple("ScaleByLarsState", "mu")
EmptyState = collections.namedtuple("EmptyState", "")

class ByolExperiment:
  def __init__(self, random_seed, num_classes, batch_size, max_steps, base_target_ema,
               network_config, optimizer_config, lr_schedule_config, checkpointing_config):
    assert checkpointing_config["checkpoint_dir"] != "/nonexistent"
    self.num_classes, self.max_steps, self.base_ema = num_classes, max_steps, base_target_ema
    self.peak_lr = lr_schedule_config["base_learning_rate"] * batch_size / 256
    self.warmup = lr_schedule_config["warmup_steps"]
    self.opt, self.net = optimizer_config, network_config
    self.forward = hk.without_apply_rng(hk.transform_with_state(self._forward))
    self.update_pmap = jax.pmap(self._update_fn, axis_name="i")

  def _forward(self, inputs, is_training):
    c = self.net
    net = getattr(networks, c["encoder_class"])(bn_config=c["bn_config"], **c["encoder_config"])
    projector = networks.MLP("projector", c["projector_hidden_size"],
                             c["projector_output_size"], c["bn_config"])
    predictor = networks.MLP("predictor", c["predictor_hidden_size"],
                             c["projector_output_size"], c["bn_config"])
    classifier = hk.Linear(self.num_classes, name="classifier")
    def once(images):
      embedding = net(images, is_training)
      projection = projector(embedding, is_training)
      return dict(projection=projection, prediction=predictor(projection, is_training),
                  logits=classifier(jax.lax.stop_gradient(embedding)))
    return once(inputs["view1"]), once(inputs["view2"])

  def _make_initial_state(self, rng, dummy_input):
    online_rng, target_rng = jax.random.split(rng)
    online_params, online_state = self.forward.init(online_rng, dummy_input, True)
    target_params, target_state = self.forward.init(target_rng, dummy_input, True)
    mu = jax.tree.map(jnp.zeros_like, online_params)
    return _ByolExperimentState(online_params, target_params, online_state, target_state,
                                (EmptyState(), ScaleByLarsState(mu), EmptyState()))

  def loss_fn(self, online_params, target_params, online_state, target_state, rng, inputs):
    inputs = augmentations.postprocess(inputs, rng)
    online, online_state = self.forward.apply(online_params, online_state, inputs, True)
    target, target_state = self.forward.apply(target_params, target_state, inputs, True)
    normed = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    regression = lambda p, z: jnp.sum((normed(p) - normed(jax.lax.stop_gradient(z))) ** 2, -1)
    repr_loss = jnp.mean(regression(online[0]["prediction"], target[1]["projection"])
                         + regression(online[1]["prediction"], target[0]["projection"]))
    classif_loss = networks.cross_entropy(online[0]["logits"], inputs["labels"], self.num_classes)
    return repr_loss + classif_loss, (online_state, target_state,
                                      dict(repr_loss=repr_loss, classif_loss=classif_loss))

  def _lars(self, grads, params, mu, lr):
    opt, new_mu, updated = self.opt, {}, {}
    for module in params:
      new_mu[module], updated[module] = {}, {}
      for name, p in params[module].items():
        g = grads[module][name]
        if name != "b" and "norm" not in module:
          g = g + opt["weight_decay"] * p
          p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
          g = g * jnp.where((p_norm > 0) & (g_norm > 0), opt["eta"] * p_norm / g_norm, 1.0)
        new_mu[module][name] = opt["momentum"] * mu[module][name] + g
        updated[module][name] = p - lr * new_mu[module][name]
    return updated, new_mu

  def _update_fn(self, state, global_step, rng, inputs):
    grads, (online_state, target_state, logs) = jax.grad(self.loss_fn, has_aux=True)(
        state.online_params, state.target_params, state.online_state, state.target_state, rng,
        inputs)
    grads = jax.tree_map(lambda g: jax.lax.pmean(g, "i"), grads)
    logs = jax.tree_map(lambda x: jax.lax.pmean(x, "i"), logs)
    step = global_step.astype(jnp.float32)
    lr = jnp.where(step < self.warmup, step / self.warmup * self.peak_lr,
                   networks.cosine(step - self.warmup, self.max_steps - self.warmup,
                                   self.peak_lr))
    tau = 1 - (1 - self.base_ema) * networks.cosine(step, self.max_steps, 1.0)
    online_params, mu = self._lars(grads, state.online_params, state.opt_state[1].mu, lr)
    ema_source = online_params
    target_params = jax.tree_map(lambda t, o: t + (1 - tau) * (o - t), state.target_params,
                                 ema_source)
    return _ByolExperimentState(
        online_params, target_params, online_state, target_state,
        (EmptyState(), ScaleByLarsState(mu), EmptyState())), dict(
            logs, learning_rate=lr, tau=tau)
""",
    "byol/eval_experiment.py": """
import collections
import haiku as hk
import jax
import optax
from byol.utils import networks

_EvalExperimentState = collections.namedtuple(
    "_EvalExperimentState",
    "backbone_params classif_params backbone_state backbone_opt_state classif_opt_state")

class EvalExperiment:
  def __init__(self, random_seed, num_classes, batch_size, max_steps, network_config,
               optimizer_config, lr_schedule_config, checkpointing_config):
    assert checkpointing_config["checkpoint_dir"] != "/nonexistent"
    self.num_classes, self.max_steps, self.opt = num_classes, max_steps, optimizer_config
    self.peak_lr = lr_schedule_config["base_learning_rate"] * batch_size / 256
    bn = dict(decay_rate=network_config["bn_decay_rate"])
    encoder = getattr(networks, network_config["encoder_class"])
    self.backbone = hk.without_apply_rng(hk.transform_with_state(
        lambda inputs, is_training: encoder(None, bn, **network_config["encoder_config"])(
            inputs["images"], is_training)))
    self.classif = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(num_classes)(x)))
    self.update_pmap = jax.pmap(self._update_func, axis_name="i")

  def _make_initial_state(self, rng, dummy_input, backbone_params, backbone_state):
    embeddings, _ = self.backbone.apply(backbone_params, backbone_state, dummy_input, True)
    classif_params = self.classif.init(rng, embeddings)
    sgd = optax.sgd(0.0, **self.opt)
    return _EvalExperimentState(backbone_params, classif_params, backbone_state,
                                sgd.init(backbone_params), sgd.init(classif_params))

  def _update_func(self, state, global_step, inputs):
    def loss_fn(classif_params):
      embeddings, _ = self.backbone.apply(state.backbone_params, state.backbone_state, inputs,
                                          False)
      loss = networks.cross_entropy(self.classif.apply(classif_params, embeddings),
                                    inputs["labels"], self.num_classes)
      return loss / jax.device_count(), loss
    grads, loss = jax.grad(loss_fn, has_aux=True)(state.classif_params)
    grads = jax.lax.psum(grads, "i")
    lr = networks.cosine(global_step, self.max_steps, self.peak_lr)
    updates, opt_state = optax.sgd(lr, **self.opt).update(grads, state.classif_opt_state)
    return state._replace(classif_params=optax.apply_updates(state.classif_params, updates),
                          classif_opt_state=opt_state), dict(
                              train_loss=jax.lax.pmean(loss, "i"))
""",
}
PARITY_ARGS = ("--image_size=16", "--batch_size=8")


def _write_parity_stand_in(folder, edit=lambda name, text: text):
  for name, text in _PARITY_STAND_IN.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(edit(name, text))


def _parity(folder, devices, steps, *args):
  """reference_parity.py on the stand-in in `folder`: (exit status, stdout, figures)."""
  path = folder / "parity.json"
  result = subprocess.run([sys.executable, os.path.join(BENCH, "reference_parity.py"),
                           f"--reference_dir={folder}", *PARITY_ARGS, f"--devices={devices}",
                           f"--steps={steps}", f"--json={path}", *args],
                          capture_output=True, text=True, timeout=900,
                          cwd=REPO, env=_env())
  assert result.returncode in (0, 1) and path.exists(), (result.stdout[-3000:] +
                                                         result.stderr[-3000:])
  return result.returncode, result.stdout, json.loads(path.read_text())


def test_reference_parity_of_a_faithful_reference_on_two_devices(tmp_path):
  """The step and the linear-evaluation step of a faithful stand-in match byol_jax's:
  losses to the script's 1e-5, every tensor to float32 rounding. (Rounding alone reaches
  ~1e-4 in some gradient sums of this 4-channel net, as far as the stand-in moves from
  itself when its views move one ulp, so tensors are held to 1e-3 here.)"""
  _write_parity_stand_in(tmp_path)
  _, stdout, figures = _parity(tmp_path, devices=2, steps=2)
  assert figures["losses_passed"] and figures["worst_tensor_relative"] <= 1e-3, stdout
  assert figures["settings"]["steps"] == [78, 79] and figures["settings"]["warmup_steps"] == 80
  assert set(figures["runs"]) == {"pretrain, 2 device(s)", "linear_eval, 2 device(s)"}
  pretrain, linear = figures["runs"]["pretrain, 2 device(s)"], figures["runs"][
      "linear_eval, 2 device(s)"]
  assert len(pretrain) == len(linear) == 2
  assert set(pretrain[-1]["tensors"]["worst"]) == {"online params", "target params",
                                                   "BN statistics", "LARS momentum"}
  assert set(pretrain[-1]["losses"]) == {"BYOL loss", "probe loss", "lr", "tau"}
  # The biases feeding BatchNorm hold float rounding only, in both.
  sizes = pretrain[-1]["tensors"]["loss_invariant_max_abs"]
  assert "LARS momentum predictor/linear1/b" in sizes and max(map(max, sizes.values())) < 1e-5
  assert set(linear[-1]["tensors"]["worst"]) == {"classifier", "momentum",
                                                 "encoder BN statistics"}
  for line in ("[pretrain, 2 device(s)] global_step 79: BYOL loss",
               "the reference against itself, its views one ulp up: BYOL loss",
               "[linear_eval, 2 device(s)] step 1: loss", "worst tensors: online params"):
    assert line in stdout, line


def test_reference_parity_names_the_tensor_a_wrong_step_breaks(tmp_path):
  """A stand-in whose EMA reads the online parameters before their update: after the first
  update only the target differs (the online step has not read it yet), and the script
  names a target tensor and fails."""
  _write_parity_stand_in(tmp_path, lambda name, text: text.replace(
      "ema_source = online_params", "ema_source = state.online_params"))
  returncode, stdout, figures = _parity(tmp_path, devices=1, steps=1)
  assert returncode == 1 and stdout.strip().splitlines()[-1].startswith("FAIL (float32): ")
  first = figures["runs"]["pretrain, 1 device(s)"][0]["tensors"]["worst"]
  assert first["target params"]["relative"] > 1e-2
  assert re.match(r"(encoder|projector)/", first["target params"]["tensor"])
  assert first["online params"]["relative"] < 1e-3 and first["LARS momentum"]["relative"] < 1e-3
  assert not figures["tensors_passed"]


def test_reference_parity_in_float64_holds_a_faithful_reference_to_1e_8(tmp_path):
  """--dtype=float64: both steps in float64, the stand-in's hard-coded float32 (its lr's
  `global_step.astype(jnp.float32)`, as the reference's schedules) read as float64 (else the
  script stops: its lr would be float32), losses to 1e-12 and every tensor to 1e-8."""
  _write_parity_stand_in(tmp_path)
  returncode, stdout, figures = _parity(tmp_path, 1, 1, "--dtype=float64")
  assert returncode == 0 and figures["passed"], stdout
  assert figures["settings"]["dtype"] == "float64" and figures["tolerances"]["tensor"] == 1e-8
  assert figures["worst_loss_relative"] <= 1e-12 and figures["worst_tensor_relative"] <= 1e-8
  assert "jnp.float32 is float64 in the reference's byol.byol_experiment" in stdout
  assert "one ulp up" not in stdout
  assert stdout.strip().splitlines()[-1].startswith("PASS (float64): losses within 1e-12")


def test_reference_parity_names_a_batch_that_does_not_split(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(BENCH, "reference_parity.py"),
                           f"--reference_dir={tmp_path}", "--batch_size=12", "--devices=1,8"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
  assert result.returncode != 0
  assert "--batch_size=12 does not split over 8 devices" in result.stderr


# ----------------------------------------------------------------------------
# demo_seeds.py (its real run is tests/test_demo_recipe.py, BYOL_SLOW=1)
# ----------------------------------------------------------------------------

def _seed_row(seed, knn, linear, spreads):
  return {"seed": seed, "knn_byol": knn, "knn_random": 0.15, "linear_byol": linear,
          "linear_random": 0.17, "knn_gap": knn - 0.15, "linear_gap": linear - 0.17,
          "test_spread": 0.7, "train_spread": _load("demo_seeds").spread_at(
              [{"step": s, "projection_std": v} for s, v in spreads.items()], [1000]),
          "byol_loss_end": 0.8, "collapse_warnings": [],
          "pretrain": {"wall_s": 200.0, "cpu_s": 330.0}, "compare": {"wall_s": 20, "cpu_s": 30}}


def test_demo_seeds_summarises_and_merges_records(tmp_path, capsys):
  seeds = _load("demo_seeds")
  row = _seed_row(3, 0.30, 0.33, {100: 0.66, 900: 0.70, 1100: 0.71, 3375: 0.69})
  assert row["train_spread"] == {"at": {"900": 0.70, "3375": 0.69}, "min": 0.66, "min_step": 100}
  records = []
  for i, rows in enumerate([[row], [_seed_row(1, 0.26, 0.35, {100: 0.6, 3375: 0.65})]]):
    records.append(str(tmp_path / f"r{i}.json"))
    with open(records[-1], "w") as f:
      json.dump({"config": "demo", "overrides": [], "started": f"t{i}", "finished": f"u{i}",
                 "rows": rows}, f)
  report = seeds.main(["--merge", *records, f"--json={tmp_path / 'all.json'}"])
  assert [r["seed"] for r in report["rows"]] == [1, 3]
  s = report["summary"]
  assert s["knn_gap"]["min"] == pytest.approx(0.11) and s["knn_gap"]["max"] == pytest.approx(0.15)
  assert s["linear_byol"]["mean"] == pytest.approx(0.34) and s["train_spread_min"] == 0.6
  out = capsys.readouterr().out
  assert "gap 13.0 (11.0 to 15.0)" in out and "+15.0/+16.0" in out
  with open(tmp_path / "all.json") as f:
    assert json.load(f)["merged_from"] == records
  with open(records[1], "w") as f:
    json.dump({"config": "demo", "overrides": ["seed=1"], "rows": []}, f)
  with pytest.raises(SystemExit, match="one recipe"):
    seeds.main(["--merge", *records])


# ----------------------------------------------------------------------------
# init_compile.py
# ----------------------------------------------------------------------------

def test_init_compile_prints_both_compiles_and_keeps_the_parameters():
  out = _run("init_compile.py", "--configs=demo", "--draws=2", host_devices=1)
  assert re.search(r"2 threefry draws: options [\d.]+ s, bits same", out), out
  assert re.search(r"2 threefry draws: unpartitionable [\d.]+ s, bits differ", out), out
  line = re.search(r"demo init at 16 px: default ([\d.]+) s, options ([\d.]+) s; (\d+) of (\d+) "
                   r"leaves differ .*, 0 of them parameters", out)
  assert line and _positive(float(line[1])) and _positive(float(line[2])), out
  assert int(line[3]) < int(line[4]), out
