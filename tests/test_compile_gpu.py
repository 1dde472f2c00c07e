"""--job=compile for NVIDIA GPUs: names, target descriptions, FLOPs counted from the HLO by
hand, the one-line errors; and, where JAX's CUDA plugin is installed (`make
test-gpu-compile`), real compiles for h100 and h100x8 without a GPU, in subprocesses."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from byol_jax.errors import ConfigError
from byol_jax.preflight import gpu, gpu_cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and \
    importlib.util.find_spec(gpu.PLUGIN) is not None
needs_plugin = pytest.mark.skipif(not HAS_PLUGIN, reason="needs JAX's CUDA plugin: "
                                  "`make test-gpu-compile` installs it in its own venv")


@pytest.mark.parametrize("name, gpu_name, nodes, per_node", [
    ("h100", "h100", 1, 1), ("H100x8", "h100", 1, 8), ("h100:2x8", "h100", 2, 8),
    ("a100-40gb", "a100-40gb", 1, 1), ("a100-80gbx4", "a100-80gb", 1, 4),
    ("h200:4x8", "h200", 4, 8)])
def test_gpu_names(name, gpu_name, nodes, per_node):
  assert gpu.is_gpu(name)
  topo = gpu.parse(name)
  assert (topo.gpu, topo.nodes, topo.gpus_per_node) == (gpu_name, nodes, per_node)
  assert topo.num_devices == nodes * per_node


@pytest.mark.parametrize("name", ["h100x9", "h100:2x0", "h100x", "a100", "h100:2"])
def test_bad_gpu_names_are_one_line_listing_the_forms(name):
  with pytest.raises(ConfigError) as err:
    gpu.parse(name)
  assert "\n" not in str(err.value) and "h100:2x8" in str(err.value)


def test_tpu_names_are_not_gpus():
  assert not any(gpu.is_gpu(n) for n in ("v4-128", "v5litepod-4", "v5p:4x4x4", "", None))


def test_target_description_is_the_table():
  text = gpu.target_config("a100-40gb")
  for field in ("core_count: 108", "clock_rate_ghz: 1.41", "memory_bandwidth: 1555200000000",
                "device_memory_size: 42331013120", "major: 8", '"NVIDIA A100-SXM4-40GB"'):
    assert field in text
  assert gpu.chip("h100").bf16_flops == 989.4e12 and gpu.chip("h200").hbm_bandwidth == 4.8e12


def test_missing_plugin_is_one_line_with_the_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError) as err:
    gpu.devices(gpu.parse("h100"))
  import jax  # pylint: disable=g-import-not-at-top
  assert str(err.value) == gpu.install_line()
  assert f'pip install "jax[cuda12]=={jax.__version__}"' in str(err.value)
  assert "\n" not in str(err.value)


def test_largest_batch_scales_the_batch_memory():
  # 4 GiB fixed + 1 GiB per 32 examples; 0.9 x 40 GiB - 4 GiB = 32 GiB -> 1024 examples.
  g = 2.0**30
  assert gpu.largest_batch(32, 5 * g, 4 * g, 40 * g, 0.1) == 1024
  assert gpu.largest_batch(32, 5 * g, 4 * g, 4 * g, 0.1) == 0
  assert gpu.largest_batch(32, 5 * g, 4 * g, 5 * g, 0.1) == 16   # 0.5 GiB: 16 examples
  assert gpu.largest_batch(32, 5 * g, 4 * g, 4.5 * g, 0.1) == 1  # 0.05 GiB: 1.6 examples


# Shapes as XLA:GPU writes them (operands by name); a forward, a filter-gradient and an
# input-gradient convolution, a cuBLAS GEMM and a Triton GEMM fusion.
HLO = """
ENTRY %main.1 (p0: bf16[8,16,16,8], p1: bf16[16,3,3,8]) -> bf16[8,16,16,16] {
  %x = bf16[8,16,16,8]{3,2,1,0} parameter(0)
  %w = bf16[16,3,3,8]{3,2,1,0} parameter(1)
  %dy = bf16[8,8,8,16]{3,2,1,0} parameter(2)
  %a = f32[64,256]{1,0} parameter(3)
  %b = f32[256,32]{1,0} parameter(4)
  %fwd = (bf16[8,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", backend_config={"operation_queue_id":"0"}
  %bwf = (bf16[16,3,3,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %dy), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"
  %bwi = (bf16[8,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%dy, %w), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput"
  %gemm = (f32[64,32]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %tri = f32[64,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%g, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  ROOT %r = bf16[8,8,8,16]{3,2,1,0} get-tuple-element(%fwd), index=0
}
"""


def test_library_calls_counted_by_hand():
  found = gpu_cost.library_calls(HLO)
  # Each convolution: 8 images x 8x8 outputs x 16 filters x (3x3x8) multiply-adds, x2.
  conv = 2 * 8 * 8 * 8 * 16 * 3 * 3 * 8
  gemm = 2 * 64 * 32 * 256
  assert found["convolution_flops"] == 3 * conv
  assert found["flops"] == 3 * conv + gemm
  x, w, dy = 8 * 16 * 16 * 8 * 2, 16 * 3 * 3 * 8 * 2, 8 * 8 * 8 * 16 * 2
  assert found["bytes"] == 3 * (x + w + dy) + (64 * 256 + 256 * 32 + 64 * 32) * 4
  assert found["calls"] == {"cudnn": 3, "cublas": 1, "triton": 1, "other": 0}


# --- The CUDA compiler, in subprocesses (the plugin must not start CUDA) -------------

TINY = ["--config=demo", "--config.batch_size=16", "--config.model.base_channels=4",
        "--config.model.projector_hidden=16", "--config.model.predictor_hidden=16",
        "--config.model.projection_dim=8", "--config.data.image_size=32",
        "--config.eval.batch_size=16", "--config.linear_eval.batch_size=16"]


def run_python(args, timeout=900, xla_flags=""):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=REPO)


@needs_plugin
@pytest.mark.parametrize("topology, devices", [("h100", 1), ("h100x8", 8)])
def test_tiny_net_compiles_for_h100(tmp_path, topology, devices):
  """The steps `--job=pretrain` runs. XLA's Triton GEMM fusion aborts on some of this tiny
  net's shapes (jax 0.10.2; README), so its GEMMs go to cuBLAS here."""
  result = run_python(["-m", "byol_jax.main", "--job=compile", *TINY, f"--workdir={tmp_path}",
                       f"--config.compile.topology={topology}",
                       "--config.compile.steps=('pretrain', 'eval')"],
                      xla_flags="--xla_gpu_enable_triton_gemm=false")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "compile_report.json").read_text())
  assert report["topology"]["devices"] == devices
  assert report["gpu"]["device_kind"] == "NVIDIA H100 80GB HBM3"
  # "eval" is periodic evaluation's three programs: the forward, the kNN's scoring, the probe.
  assert set(report["steps"]) == {"pretrain", "eval", "knn", "probe"}
  assert report["steps"]["knn"]["largest_batch_per_gpu_estimate"] is None  # a whole split
  step = report["steps"]["pretrain"]
  assert step["examples_per_device"] == 16 / devices
  assert step["convolution_flops"] > 0 and step["flops"] > step["convolution_flops"]
  assert step["library_calls"]["cudnn"] > 0 and step["library_calls"]["cublas"] > 0
  assert 0 < step["memory_needed_lower_bound"] < report["gpu"]["usable_bytes"]
  if devices > 1:  # the gradient mean and the cross-replica BN moments
    assert step["collectives"]["all-reduce"]["bytes"] > 0
  assert "roofline ESTIMATE" in result.stdout and "lower bound" in result.stdout


CONV_NET = """
import json, jax, jax.numpy as jnp
from byol_jax.preflight import compile as compile_lib, gpu
dev = gpu.devices(gpu.parse("h100"))[0]
s = jax.sharding.SingleDeviceSharding(dev)
x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.bfloat16, sharding=s)
ws = (jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.bfloat16, sharding=s),
      jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.bfloat16, sharding=s))
def loss(ws, x):
  for w in ws:
    x = jax.nn.relu(jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                    dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return jnp.mean(x.astype(jnp.float32) ** 2)
step = compile_lib.Step(jax.jit(jax.grad(loss)), (ws, x), 8)
row = compile_lib.compile_step("grad", step)
print(json.dumps({k: row[k] for k in ("flops", "convolution_flops", "library_calls")}))
"""


@needs_plugin
def test_conv_net_flops_by_hand():
  """Two strided 3x3 convolutions, forward and backward: 32x32x3 -> 16x16x16 -> 8x8x32."""
  result = run_python(["-c", CONV_NET], timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  first = 2 * 8 * 16 * 16 * 16 * 3 * 3 * 3      # forward; its filter gradient is the same
  second = 2 * 8 * 8 * 8 * 32 * 3 * 3 * 16      # forward, filter and input gradients
  # The first layer's input gradient is not needed (x is not differentiated).
  assert row["convolution_flops"] == 2 * first + 3 * second
  assert row["flops"] >= row["convolution_flops"]
  assert row["flops"] < 1.2 * row["convolution_flops"]  # the rest: ReLUs, the mean
  assert row["library_calls"]["cudnn"] == 5


def test_a_step_too_big_for_the_gpu_is_one_line_saying_what_to_change():
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  from byol_jax.jobs import compile_gpu  # pylint: disable=g-import-not-at-top
  config = config_lib.load("resnet50_imagenet")
  config.batch_size = 8192
  topo = gpu.parse("a100-40gb:2x8")
  has = gpu.GPUS["a100-40gb"].memory_bytes * compile_gpu.MEM_FRACTION
  row = {"memory_needed_lower_bound": 2.5 * has, "memory_fraction": 2.5,
         "largest_batch_per_gpu_estimate": 192}
  line = compile_gpu.does_not_fit("pretrain", row, has, config, topo)
  assert "\n" not in line
  assert line.startswith(f"The pretrain step needs at least {2.5 * has / 2**30:.2f} GiB per GPU; "
                         f"a NVIDIA A100-SXM4-40GB gives JAX {has / 2**30:.2f} GiB.")
  assert "--config.batch_size=3072 (192 per GPU" in line
  assert "--config.compute_dtype=bfloat16" in line and "--config.model.remat=True" in line
  # 16 GPUs x 2.5 / 0.9 -> 44.4 -> 64 GPUs: 8 nodes of 8.
  assert line.endswith("more GPUs: --config.compile.topology=a100-40gb:8x8.")
