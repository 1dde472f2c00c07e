"""Training on in-memory arrays needs no TensorFlow: each check runs in a subprocess
in which `import tensorflow` (and tensorflow_datasets) fails, as on a machine
without them."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# None in sys.modules makes every later `import tensorflow` raise ImportError.
NO_TF = ("import sys\n"
         "sys.modules['tensorflow'] = None\n"
         "sys.modules['tensorflow_datasets'] = None\n")


def run_without_tf(code: str, timeout=600) -> str:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-c", NO_TF + textwrap.dedent(code)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  return result.stdout


def read_events(path: str):
  """The Event protos of a TensorBoard event file (a TFRecord stream)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      events.append(event_pb2.Event.FromString(f.read(length)))
      f.read(4)  # the data's checksum
  return events


def test_in_memory_pipeline_reporting_and_clear_error_without_tensorflow(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (40, 12, 12, 3), np.uint8)
  np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.arange(40) % 4)
  out = run_without_tf(f"""
    import byol_jax
    from byol_jax import reporting, tf_import
    from byol_jax.configs import base
    from byol_jax.data import datasets, input_pipeline
    from byol_jax.train import train_step
    try:
      tf_import.import_tensorflow()
    except tf_import.TensorFlowMissingError as e:
      print("missing:", e)
    c = base.get_base_config()
    c.batch_size, c.data.image_size = 8, 8
    c.data.source, c.data.path, c.data.train_split = "npz", r"{tmp_path / 'd.npz'}", "train"
    assert datasets.crop_on_device(c)
    batch = next(input_pipeline.pretrain_batches(c, start_step=3, process_index=0,
                                                 process_count=1))
    print("keys:", sorted(batch))
    ev = list(input_pipeline.eval_batches(c, "train", batch_size=16, process_index=0,
                                          process_count=1))
    print("eval batches:", len(ev))
    r = reporting.Reporter(r"{tmp_path / 'run'}", total_steps=2, batch_size=8)
    r.write(1, {{"byol_loss": 3.5}})
    print("plot:", r.plot())
  """)
  assert "missing: TensorFlow is not installed" in out and "source=npz" in out
  assert "keys: ['crop_seed', 'image', 'label']" in out and "eval batches: 3" in out
  (event_file,) = os.listdir(tmp_path / "run" / "tensorboard" / "pretrain")
  events = read_events(str(tmp_path / "run" / "tensorboard" / "pretrain" / event_file))
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value] == [
      (1, "byol_loss", 3.5)]
  assert "pretrain_curves.png" in out


def test_bench_step_on_device_cropped_arrays_without_tensorflow(tmp_path):
  path = tmp_path / "figures.json"
  run_without_tf(f"""
    import runpy
    sys.argv = ["bench_step.py", "--config=demo", "--batch_size=8", "--image_size=16",
                "--base_channels=4", "--input=arrays", "--source_size=24", "--steps=1",
                "--peak_seconds=0.1", "--json={path}"]
    runpy.run_path("benchmarks/bench_step.py", run_name="__main__")
  """)
  figures = json.loads(path.read_text())
  assert figures["input"] == "arrays" and figures["train_images_per_s"] > 0
  assert figures["timing_windows"] == 1  # --steps=1: one timed step
  assert 0 < figures["augment_share_of_step"] and figures["augment_crop_s"] > 0


def test_pretraining_the_demo_through_main_without_tensorflow(tmp_path):
  workdir = tmp_path / "run"
  run_without_tf(f"""
    import runpy
    sys.argv = ["main", "--config=demo", "--workdir={workdir}", "--config.steps=2",
                "--config.batch_size=16", "--config.model.base_channels=4",
                "--config.data.image_size=16", "--config.data.train_split=train[:64]",
                "--config.data.test_split=test[:32]", "--config.eval.batch_size=32",
                "--config.log_every_steps=1", "--config.checkpoint.every_steps=2"]
    runpy.run_module("byol_jax.main", run_name="__main__")
  """)
  records = [json.loads(line) for line in (workdir / "pretrain_metrics.jsonl").read_text()
             .splitlines()]
  assert [r["step"] for r in records if "byol_loss" in r] == [1, 2]
  assert all(np.isfinite(r["byol_loss"]) for r in records if "byol_loss" in r)
  assert any("eval/knn_top1" in r for r in records)
  assert os.listdir(workdir / "tensorboard" / "pretrain")
