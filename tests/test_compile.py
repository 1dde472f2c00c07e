"""--job=compile: TPU slice names, the roofline arithmetic, and a tiny net compiled for a
v5e slice by the TPU compiler (libtpu, installed by `make test`), in a subprocess."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from byol_jax import config_lib
from byol_jax.data import batch as batch_lib
from byol_jax.data import datasets
from byol_jax.errors import ConfigError
from byol_jax.jobs import compile as compile_job
from byol_jax.preflight import compile as compile_lib
from byol_jax.preflight import roofline, topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Slice names --------------------------------------------------------------

@pytest.mark.parametrize("name, topology_name, chips, devices", [
    ("v4-8", "v4:2x2x1", 4, 4),            # 8 TensorCores, one megacore device per chip
    ("v4-128", "v4:4x4x4", 64, 64),
    ("v4-256", "v4:4x4x8", 128, 128),
    ("v5p-128", "v5p:4x4x4", 64, 64),
    ("v5litepod-4", "v5e:2x2", 4, 4),      # v5e and v6e names count chips
    ("v5litepod-256", "v5e:16x16", 256, 256),
    ("v6e-8", "v6e:2x4", 8, 8),
    ("v3-8", "v3:2x2", 4, 8),              # v3: one device per TensorCore
    ("v4:4x4x8", "v4:4x4x8", 128, 128),
    ("V5E:2X4", "v5e:2x4", 8, 8),
])
def test_cloud_names_and_shapes(name, topology_name, chips, devices):
  topo = topology.parse(name)
  assert (topo.topology_name, topo.chips, topo.num_devices) == (topology_name, chips, devices)
  assert topology.parse(topology.cloud_name(topo.generation, chips)).shape == topo.shape


def test_slices_multiply_the_chips():
  topo = topology.parse("v5litepod-16", num_slices=2)
  assert (topo.topology_name, topo.chips, topo.num_devices) == ("v5e:4x4", 32, 32)


@pytest.mark.parametrize("name", ["v4-12", "v7-8", "v4:2x2", "v5litepod-2", "tpu", "", "v3-7"])
def test_unknown_topology_is_one_line_listing_the_forms(name):
  with pytest.raises(ConfigError) as err:
    topology.parse(name)
  message = str(err.value)
  assert "\n" not in message
  assert f"Unknown TPU topology {name!r}" in message
  for form in ("v4-128", "v5litepod-256", "v5p-128", "v6e-64", "v4:4x4x4"):
    assert form in message


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cloud_tpu_init, "get_tpu_library_path", lambda: None)
  monkeypatch.setattr(topology, "quiet_libtpu", lambda: None)  # leave the environment as is
  with pytest.raises(ImportError) as err:
    topology.devices(topology.parse("v5litepod-4"))
  assert str(err.value) == topology.TPU_INSTALL
  assert 'pip install -e ".[tpu]"' in topology.TPU_INSTALL and "\n" not in topology.TPU_INSTALL


# --- The roofline -------------------------------------------------------------

def test_roofline_against_a_hand_computation():
  """The issue's first probe: 2.04 TFLOP and 90.7 GB per device per step on half a v4
  chip (a TensorCore: 137.5 TFLOP/s, 600 GB/s), 32 examples per device."""
  r = roofline.estimate(2.04e12, 90.7e9, 32, roofline.CHIPS["v4"], devices_per_chip=2)
  assert r["compute_s"] == pytest.approx(2.04e12 / 137.5e12)      # 14.8 ms
  assert r["memory_s"] == pytest.approx(90.7e9 / 600e9)           # 151 ms
  assert r["step_s"] == r["memory_s"] and r["bound"] == "memory"
  assert r["mfu_ceiling"] == pytest.approx(14.836 / 151.17, rel=1e-3)  # ~10%
  assert r["images_per_s_per_chip"] == pytest.approx(64 / 0.15117, rel=1e-3)
  assert r["bytes_per_flop"] == pytest.approx(0.04446, rel=1e-3)
  compute_bound = roofline.estimate(2.04e12, 1e9, 32, roofline.CHIPS["v4"])
  assert compute_bound["bound"] == "compute" and compute_bound["mfu_ceiling"] == 1.0


def test_reference_anchors():
  # 1000 epochs of 1,281,167 images in 8 h on 256 v3 chips; flax: 100 epochs in 4.4 h on 4.
  assert roofline.REFERENCE_IMAGES_PER_S_PER_V3_CHIP == pytest.approx(173.8, abs=0.1)
  assert roofline.FLAX_IMAGES_PER_S_PER_V3_CHIP == pytest.approx(2022, abs=1)


# --- Collectives read off the HLO -----------------------------------------------

HLO = """
ENTRY %main {
  %all-reduce.1 = (f32[8]{0:T(128)S(1)}, bf16[3,3,64,64]{3,2,1,0}) all-reduce(%a, %b), channel_id=2
  %all-reduce-start.2 = f32[1000]{0} all-reduce-start(%c), channel_id=3
  %all-reduce-done.2 = f32[1000]{0} all-reduce-done(%all-reduce-start.2)
  %all-gather-start.3 = (f32[4]{0}, f32[16]{0}) all-gather-start(%d), dimensions={0}
  %fusion.4 = f32[8]{0} fusion(%all-reduce.1), kind=kLoop
}
"""


def test_collective_bytes_of_an_hlo_module():
  found = compile_lib.collective_bytes(HLO)
  assert found["all-reduce"] == {"count": 2, "bytes": 8 * 4 + 3 * 3 * 64 * 64 * 2 + 1000 * 4}
  assert found["all-gather"] == {"count": 1, "bytes": 16 * 4}


# --- What is compiled, without reading data ------------------------------------

def test_known_split_sizes_agree_with_the_demo_source():
  config = config_lib.load("demo")
  examples, classes, side = datasets.known_split_info(config, "train")
  assert (examples, classes) == datasets.dataset_info(config, "train")
  assert side == 32


def test_unknown_split_size_says_which_fields_to_set():
  config = config_lib.load("custom_folder")
  with pytest.raises(datasets.DataSourceError) as err:
    datasets.known_split_info(config, "train")
  assert "--config.data.num_train_examples and --config.data.num_classes" in str(err.value)
  config.data.num_train_examples, config.data.num_classes = 1000, 0
  assert datasets.known_split_info(config, "train") == (1000, 0, 0)


def test_batch_shapes_follow_the_input_pipeline():
  config = config_lib.load("resnet50_imagenet")
  shapes = batch_lib.shapes(config, "pretrain", 64)
  assert shapes == {"view1": ((64, 224, 224, 3), "float16"), "view2": ((64, 224, 224, 3),
                    "float16"), "label": ((64,), "int32")}
  config.data.source, config.data.path = "npz", "x.npz"   # in-memory: cut on the device
  shapes = batch_lib.shapes(config, "pretrain", 8, source_side=32)
  assert shapes["image"] == ((8, 32, 32, 3), "uint8")
  assert shapes["crop_seed"] == ((8, 2, 2), "uint32")
  with pytest.raises(datasets.DataSourceError, match="crop_on=host"):
    batch_lib.shapes(config, "pretrain", 8, source_side=0)


# --- The TPU compiler, in a subprocess ------------------------------------------

TINY = ["--config=demo", "--config.batch_size=16", "--config.model.base_channels=4",
        "--config.model.projector_hidden=16", "--config.model.predictor_hidden=16",
        "--config.model.projection_dim=8", "--config.data.image_size=8",
        "--config.eval.batch_size=16", "--config.linear_eval.batch_size=16"]


def require_libtpu():
  """Skips without the TPU compiler, except in CI (CI=true), where it is installed
  (requirements-dev.txt) and its absence is a broken install, not a reason to skip."""
  if importlib.util.find_spec("libtpu") is not None:
    return
  message = "needs the TPU compiler (libtpu): pip install -e '.[tpu]'"
  if os.environ.get("CI", "").lower() in ("true", "1"):
    pytest.fail(f"CI=true but libtpu is missing; {message}")
  pytest.skip(message)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception),
                                         ("", pytest.skip.Exception)])
def test_a_missing_libtpu_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  monkeypatch.setenv("CI", ci)
  with pytest.raises(outcome, match="libtpu"):
    require_libtpu()


def run_compile(workdir, *args, timeout=600, **env_vars):
  require_libtpu()
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(PYTHONPATH=REPO, **env_vars)
  return subprocess.run([sys.executable, "-m", "byol_jax.main", "--job=compile", *TINY,
                         f"--workdir={workdir}", *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=REPO)


def test_tiny_net_compiles_for_a_v5e_slice(tmp_path):
  result = run_compile(tmp_path, "--config.compile.topology=v5litepod-4",
                       "--config.eval.every_steps=100")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "compile_report.json").read_text())
  assert report["topology"]["topology_name"] == "v5e:2x2"
  assert report["topology"]["devices"] == 4
  assert set(report["steps"]) == {"pretrain", "eval", "knn", "probe", "linear_eval"}
  # The kNN's scoring program holds a chunk of queries against the whole training split's
  # bank (demo: 3,600 rows in batches of 16 over 4 devices), and fits beside the train state.
  knn = report["steps"]["knn"]
  assert knn["examples"] == 1024 and 0 < knn["hbm_needed"] < report["chip"]["hbm_bytes_per_device"]
  assert knn["hbm_needed"] > report["steps"]["pretrain"]["memory"]["arguments"] / 2
  assert report["steps"]["probe"]["flops"] > 0
  assert "periodic evaluation (ESTIMATE" in result.stdout
  step = report["steps"]["pretrain"]
  assert step["examples_per_device"] == 4
  assert step["flops"] > 0 and step["bytes_accessed"] > 0
  assert 0 < step["hbm_needed"] < report["chip"]["hbm_bytes_per_device"]
  # The gradient mean and the cross-replica BN moments are all-reduces.
  assert step["collectives"]["all-reduce"]["bytes"] > 0
  assert step["roofline"]["step_s"] > 0
  assert "roofline ESTIMATE" in result.stdout and "estimate, not a measurement" in result.stdout


def test_a_batch_too_big_for_the_chip_gets_the_memory_error(tmp_path):
  """The evaluation forward (the quickest step to compile) of a batch no v5e chip holds; the
  workdir is on gs:// (a real Cloud Storage server, tests/gcs_server.py), where the report
  still lands."""
  from tests import gcs_server  # pylint: disable=g-import-not-at-top
  with gcs_server.fake_gcs_server(str(tmp_path / "gcs.log")) as url:
    gcs_server.create_bucket(url)
    workdir = f"gs://{gcs_server.BUCKET}/compiled"
    result = run_compile(workdir, "--config.compile.topology=v5litepod-1",
                         "--config.compile.steps=('eval',)", "--config.eval.batch_size=4194304",
                         "--config.data.image_size=64", STORAGE_EMULATOR_HOST=url)
    report = gcs_server.read_bytes(url, f"{workdir}/compile_report.json")
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: The eval step needs ") and "Traceback" not in result.stderr
  needed, available = map(float, re.findall(r"([\d.]+) GiB", last))
  assert needed > available == pytest.approx(15.75, abs=1)
  # The advice: a batch per chip that fits with 20% to spare, or a slice big enough.
  batch = int(re.search(r"--config.eval.batch_size=(\d+)", last).group(1))
  assert batch == 2 ** math.floor(math.log2(4194304 * 0.8 * available / needed))
  bigger = topology.parse(re.search(r"--config.compile.topology=(\S+?)\.?$", last).group(1))
  assert bigger.generation == "v5e" and bigger.chips >= needed / (0.8 * available)
  assert json.loads(report)["error"].startswith("eval:")


def test_periodic_evaluation_cost_by_hand():
  """ImageNet's recipe: 128,117 + 50,000 forwards in batches of 1024, 49 chunks of 1024
  queries against a tenth of the bank, every 5,000 steps."""
  config = config_lib.load("resnet50_imagenet")
  config.data.num_train_examples, config.data.num_classes = 1_281_167, 1000
  rows = {"pretrain": {"roofline": {"step_s": 0.064}}, "eval": {"roofline": {"step_s": 0.0064}},
          "knn": {"roofline": {"step_s": 0.01}, "examples": 1024}}
  cost = compile_job.periodic_eval_cost(config, rows)
  assert (cost["bank_examples"], cost["test_examples"]) == (128_117, 50_000)
  assert cost["forward_s"] == pytest.approx((126 + 49) * 0.0064 / roofline.CALIBRATION)
  assert cost["knn_s"] == pytest.approx(49 * 0.01 * 128_117 / 1_281_167)
  assert cost["train_s_between"] == pytest.approx(5000 * 0.064 / roofline.CALIBRATION)
  assert cost["fraction"] == pytest.approx((cost["forward_s"] + cost["knn_s"]) /
                                           cost["train_s_between"])
  config.eval.every_steps = -1
  assert compile_job.periodic_eval_cost(config, rows) is None


def _row(bound, hbm_fraction):
  return {"roofline": {"bound": bound}, "hbm_fraction": hbm_fraction}


def test_a_memory_bound_step_with_hbm_to_spare_is_pointed_at_a_denser_slice():
  """ResNet-50 at batch 4096 on v5p-128 used 5.7% of HBM: 8x the batch per chip still leaves
  20% free by linear scaling, so v5p-16 (8 chips, 512 each)."""
  hint = compile_job._denser_slice(_row("memory", 0.057), 4096, topology.parse("v5p-128"))
  assert "--config.compile.topology=v5p-16 puts 512 per chip in about 46% of HBM" in hint
  # Never below four chips; no hint when compute-bound, tight, or multi-slice.
  hint = compile_job._denser_slice(_row("memory", 0.001), 4096, topology.parse("v4-32"))
  assert "topology=v4-8 puts 1024 per chip" in hint
  assert compile_job._denser_slice(_row("compute", 0.056), 4096,
                                   topology.parse("v5p-128")) is None
  assert compile_job._denser_slice(_row("memory", 0.5), 4096, topology.parse("v5p-128")) is None
  assert compile_job._denser_slice(_row("memory", 0.056), 4096,
                                   topology.parse("v5p-128", num_slices=2)) is None


# --- benchmarks/hlo_bytes.py: where a step's bytes come from --------------------

HLO_LOOP = """
%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]) parameter(0)
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %y = f32[8,128]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%f, metadata={op_name="jit(update)/vmap()/while/body/mul"}
  ROOT %t = (s32[], f32[8,128]) tuple(%p, %y)
}

ENTRY %main (a: bf16[4,3]) -> bf16[4,3] {
  %a = bf16[4,3]{1,0:T(8,128)(2,1)} parameter(0)
  %c = bf16[4,3]{1,0:T(8,128)(2,1)} fusion(%a), kind=kLoop, calls=%g, metadata={op_name="jit(update)/jvp(encoder)/conv1/mul"}
  %cs = (bf16[4,3]{1,0:T(8,128)(2,1)S(3)}, bf16[4,3]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%c)
  %w = (s32[], f32[8,128]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %d = bf16[4,3]{1,0:T(8,128)(2,1)S(3)} copy-done(%cs)
}
"""


def test_hlo_bytes_by_hand():
  spec = importlib.util.spec_from_file_location("hlo_bytes", os.path.join(REPO, "benchmarks",
                                                                          "hlo_bytes.py"))
  hlo_bytes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hlo_bytes)
  result = hlo_bytes.analyse(HLO_LOOP)
  tile = 8 * 128  # a bf16[4,3] or f32[8,128] array fills one (8, 128) tile
  fusion = 2 * tile * 2                 # bf16 operand and result, each padded to a tile
  move = 2 * tile * 2                   # the copy-start reads and writes its destination
  loop = 3 * 2 * tile * 4               # the loop's f32 fusion, three trips
  assert result["bytes_padded"] == fusion + move + loop
  assert result["bytes_logical"] == 2 * 4 * 3 * 2 + 2 * 4 * 3 * 2 + loop
  assert result["by_source"] == {"augmentation": loop, "forward encoder": fusion,
                                 "moves between memory spaces": move}
  assert result["by_space"] == {"memory space 0": fusion + loop,
                                "moves between memory spaces": move}
  assert result["by_dtype"] == {"f32": loop, "bf16": fusion}
