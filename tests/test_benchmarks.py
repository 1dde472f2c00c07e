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
