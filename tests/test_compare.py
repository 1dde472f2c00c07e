"""The demo's summary: `--job=compare` after a tiny pretraining run, in-process."""

import json
import math
import os

import numpy as np
import pytest

from byol_jax import config_lib, jobs
from byol_jax.evaluate import evaluation, knn, pictures, readout
from byol_jax.jobs import compare
from byol_jax.train import parallel
from tests.test_main import tiny_config


@pytest.fixture(scope="module")
def compared(tiny_run):
  workdir, config = tiny_run
  return workdir, jobs.run("compare", config, workdir)


def test_table_has_both_rows_with_finite_numbers(compared, capsys):
  _, report = compared
  text = compare.table(report)
  for name in ("BYOL", "random init"):
    row = next(line for line in text.splitlines() if line.startswith(f"{name:<14}"))
    numbers = [float(x) for x in row[len(name):].replace("%", " ").split()]
    assert len(numbers) == 3 and all(math.isfinite(x) for x in numbers), row
    assert 0 <= numbers[0] <= 100 and 0 <= numbers[1] <= 100
  for key in ("byol", "random"):
    r = report["results"][key]
    assert r["finite"] and r["num_test_features"] == 256 and r["num_train_features"] == 512
  assert report["gaps"]["knn_top1"] == pytest.approx(
      report["results"]["byol"]["knn_top1"] - report["results"]["random"]["knn_top1"])


def test_writes_results_and_lists_the_files(compared):
  workdir, report = compared
  with open(os.path.join(workdir, "compare_results.json")) as f:
    assert json.load(f)["results"]["byol"]["knn_top1"] == report["results"]["byol"]["knn_top1"]
  listing = compare.files(workdir, {"results": os.path.join(workdir, "compare_results.json")})
  for name in ("pretrain_curves.png", "checkpoints", "config.json", "compare_results.json"):
    assert os.path.join(workdir, name) in listing


def test_random_baseline_reestimates_bn_statistics_only():
  """Same weights as BYOL's starting point; BN averages move off Haiku's initial zeros."""
  import jax  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  config = config_lib.prepare(tiny_config(**{"eval.batch_size": 128}), mesh)
  _, _, params0, initial = readout.initial_network(config, mesh)
  config, nets, params, state = readout.random_baseline(config, mesh, bn_split="train[:256]",
                                                        batch_size=128)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params0, params)))
  moved = jax.tree.map(lambda a, b: bool((a != b).any()), initial, state)
  assert any(jax.tree.leaves(moved))
  after = readout.features(config, nets, params, state, "test[:128]", mesh, 128)
  assert after.count == 128 and np.isfinite(np.asarray(after["embedding"])).all()
  assert evaluation.projection_spread(after["projection"], after["mask"]) > 0.1


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 3, (10, 16))
  labels = rng.integers(0, 10, 1200)
  feats = (centres[labels] + rng.normal(0, 1, (1200, 16))).astype(np.float32)
  mesh = parallel.make_mesh()
  train = knn.from_arrays(feats[:1000], labels[:1000], mesh)
  test = knn.from_arrays(feats[1000:], labels[1000:], mesh)
  result = readout.linear_probe(train, test, mesh, steps=200, lr=0.05, seed=0)
  assert result["top1"] > 0.9
  assert result["weight_decay"] in readout.PROBE_WEIGHT_DECAYS
  # Minibatches drawn on the devices (PROBE_BATCH below the row count) learn it too.
  sampled = readout.linear_probe(train, test, mesh, steps=200, lr=0.05, seed=0, batch_size=64)
  assert sampled["top1"] > 0.9


def test_pictures_are_written_and_listed(compared):
  """neighbours.png and embedding_map.png: PNGs of the drawn size, with content, listed."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, report = compared
  assert report["pictures"] == {"neighbours": os.path.join(workdir, "neighbours.png"),
                                "embedding map": os.path.join(workdir, "embedding_map.png")}
  listing = compare.files(workdir, report["pictures"])
  for name, size in (("neighbours.png", pictures.NEIGHBOURS_PX),
                     ("embedding_map.png", pictures.MAP_PX)):
    path = os.path.join(workdir, name)
    assert path in listing
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size == size
      pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{name} is nearly blank"


def test_neighbours_are_the_most_cosine_similar_and_queries_span_classes():
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
  mesh = parallel.make_mesh()
  positions, labels = knn.nearest(knn.from_arrays(train, [5, 6, 7, 8], mesh),
                                  np.array([[2.0, 0.1]]), mesh, k=3)
  np.testing.assert_array_equal(positions, [[0, 2, 1]])
  np.testing.assert_array_equal(labels, [[5, 7, 6]])
  labels = np.array([3, 3, 1, 0, 1, 2, 2])
  assert list(pictures.pick_queries(labels, count=5)) == [3, 2, 5, 0, 1]
