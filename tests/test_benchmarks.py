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


@pytest.fixture(scope="module")
def step_figures(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_step")
  figures = {}
  for devices in (1, 2):
    path = out / f"d{devices}.json"
    stdout = _run("bench_step.py", *TINY_STEP, f"--devices={devices}", f"--json={path}")
    figures[devices] = (json.loads(path.read_text()), stdout)
  return figures


def test_bench_step_prints_and_writes_every_figure(step_figures):
  figures, stdout = step_figures[1]
  for key in ("train_compile_s", "train_step_s", "train_images_per_s", "train_step_gflop_xla",
              "encoder_forward_gflop_per_image", "online_forward_gflop_per_image",
              "train_achieved_gflop_per_s", "eval_images_per_s", "eval_achieved_gflop_per_s",
              "matmul_peak_gflop_per_s", "peak_host_memory_mib", "train_images_per_cpu_s",
              "eval_images_per_cpu_s", "matmul_peak_gflop_per_cpu_s", "train_step_gflop_jaxpr"):
    assert _positive(figures[key]), (key, figures[key])
    assert re.search(rf"^{key}\s+\S+$", stdout, re.M), key  # one "name  value" line each
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


def test_linear_probe_separates_separable_features():
  bench = _load("cpu_budget_quality")
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 3, (10, 16))
  labels = rng.integers(0, 10, 1200)
  feats = (centres[labels] + rng.normal(0, 1, (1200, 16))).astype(np.float32)
  result = bench.linear_probe(feats[:1000], labels[:1000], feats[1000:], labels[1000:],
                              steps=200, lr=0.05, seed=0)
  assert result["top1"] > 0.9
  assert result["weight_decay"] in bench.PROBE_WEIGHT_DECAYS


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
