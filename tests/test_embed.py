"""Using what was learned: `--job=embed` and `byol_jax.load_encoder`, after a tiny pretraining."""

import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import byol_jax
from byol_jax import jobs
from byol_jax.data import datasets, input_pipeline
from byol_jax.evaluate import features
from byol_jax.train import checkpoint, parallel, train_step
from tests.test_main import REPO

TEST_SPLIT = "test[:100]"


@pytest.fixture(scope="module")
def run(tiny_run):
  """conftest's tiny exported run, read with eval batches of 64 on TEST_SPLIT."""
  workdir, config = tiny_run
  config = config.copy_and_resolve_references()
  config.eval.batch_size = 64
  config.data.test_split = TEST_SPLIT
  return workdir, config


def _embed(config, workdir, **fields):
  config = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, name = key.split(".")
    config[section][name] = value
  report = jobs.run("embed", config, workdir)
  with np.load(report["path"], allow_pickle=False) as f:
    return report, {k: f[k] for k in f.files}


# load_encoder jits its own forward (one device, other batch shapes) where the evaluation
# step runs on conftest's 8 devices: XLA:CPU may tile the convolutions differently, so sums
# can round differently. Measured 2026-12-07 on the 2-core AMD EPYC VM: at most 1.2e-7 apart
# (a float32 ulp at 1); 1e-5 leaves ~80x for other CPUs' vector widths and thread counts.
ENCODER_ATOL = 1e-5


def test_embed_writes_one_row_per_image_with_its_file_name(run, capsys):
  workdir, config = run
  report, out = _embed(config, workdir, **{"embed.with_projection": True, "embed.log_every": 30})
  images, want = _reference_embeddings(config, workdir)
  # The evaluation forward that kNN and compare read, on the same batches: the same program.
  np.testing.assert_array_equal(out["embedding"], want)
  np.testing.assert_allclose(out["embedding"], byol_jax.load_encoder(workdir)(images),
                             rtol=0, atol=ENCODER_ATOL)
  assert np.ptp(want, axis=0).min() > 1e-3  # the rows differ: a constant encoder fails here
  assert report["path"] == os.path.join(workdir, "embeddings.npz")
  source = datasets.load_source(config, TEST_SPLIT)
  assert out["embedding"].shape == (100, 64) and out["embedding"].dtype == np.float32
  assert out["projection"].shape == (100, 16) and out["projection"].dtype == np.float32
  assert list(out["name"]) == list(source.names) and out["name"][0].startswith("test/")
  np.testing.assert_array_equal(out["label"], source.labels)
  np.testing.assert_array_equal(out["index"], np.arange(100))
  assert list(out["class_names"])[:2] == ["airplane", "automobile"] and out["skipped"].size == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line for line in lines if "/100 images" in line] == ["[embed] 64/100 images"]
  assert lines[-1].startswith("[embed] 100 images of ") and "(embedding 64-d, projection 16-d)" in (
      lines[-1])


def test_embed_names_and_skips_undecodable_files(run, tmp_path, capsys):
  workdir, config = run
  folder = tmp_path / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i, size in enumerate([(40, 30), (20, 20), (64, 48)]):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    (folder / f"img{i}.png").write_bytes(buffer.getvalue())
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  report, out = _embed(config, workdir, **{"data.source": "folder", "data.path": str(folder),
                                           "embed.split": "train",
                                           "embed.output": str(tmp_path / "mine.npz")})
  assert report["count"] == 3 and report["skipped"] == ["broken.jpg"]
  assert list(out["name"]) == ["img0.png", "img1.png", "img2.png"]
  assert list(out["label"]) == [-1, -1, -1] and list(out["skipped"]) == ["broken.jpg"]
  assert "projection" not in out and np.isfinite(out["embedding"]).all()
  assert "skipped 1 undecodable file(s): broken.jpg" in capsys.readouterr().out


def test_embed_reads_an_npz_by_index(run, tmp_path):
  workdir, config = run
  images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / "arrays.npz", test_images=images, test_labels=np.arange(5))
  _, out = _embed(config, workdir, **{"data.source": "npz", "data.path": str(tmp_path /
                                                                             "arrays.npz")})
  assert out["embedding"].shape == (5, 64) and list(out["name"]) == [""] * 5
  assert list(out["index"]) == list(range(5)) and list(out["label"]) == list(range(5))


def _reference_embeddings(config, workdir):
  """make_embed_fn over the evaluation batches, as kNN and compare read them."""
  mesh = parallel.make_mesh()
  config, nets, params, state = checkpoint.load_pretrained(config, workdir, mesh)
  batches = list(input_pipeline.eval_batches(config, TEST_SPLIT, batch_size=64,
                                             process_index=0, process_count=1))
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  rows = features.extract(train_step.make_embed_fn(nets, mesh), params, state, batches, mesh,
                          keys=("embedding",), sample=len(images))
  return images, rows.sample["embedding"]


@pytest.mark.parametrize("where", ["workdir", "export"])
def test_load_encoder_gives_make_embed_fn_s_embeddings(run, where):
  workdir, config = run
  images, want = _reference_embeddings(config, workdir)
  encoder = byol_jax.load_encoder(os.path.join(workdir, "export") if where == "export"
                                  else workdir)
  assert encoder.embedding_dim == 64 and encoder.input_size == 16
  got = np.concatenate([encoder(images[:1]), encoder(images[1:8]), encoder(images[8:])])
  assert isinstance(encoder(images[:2]), jax.Array)
  np.testing.assert_allclose(got, want, rtol=0, atol=ENCODER_ATOL)
  np.testing.assert_allclose(encoder(images[0]), want[:1], rtol=0, atol=ENCODER_ATOL)


def test_load_encoder_takes_uint8_or_float_and_says_what_is_missing(run, tmp_path):
  workdir, _ = run
  encoder = byol_jax.load_encoder(workdir)
  pixels = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  np.testing.assert_allclose(encoder(pixels), encoder(pixels / 255.0), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"Expected RGB images \[N, H, W, 3\]"):
    encoder(pixels[..., :2])
  with pytest.raises(FileNotFoundError, match="neither an export"):
    byol_jax.load_encoder(str(tmp_path))


def test_import_byol_jax_does_not_import_jax():
  code = "import sys, byol_jax; assert 'jax' not in sys.modules; byol_jax.load_encoder"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 env={**os.environ, "PYTHONPATH": REPO})
