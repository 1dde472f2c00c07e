"""kNN, probe accuracy and the collapse monitor on hand-made features, sharded as the
evaluation shards them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.errors import ConfigError
from byol_jax.evaluate import evaluation, knn
from byol_jax.model import objectives
from byol_jax.train import parallel


def _knn(train, train_labels, test, test_labels, devices=None, **kwargs):
  mesh = parallel.make_mesh(devices)
  return knn.knn_accuracy(knn.from_arrays(train, train_labels, mesh),
                          knn.from_arrays(test, test_labels, mesh), mesh,
                          num_classes=kwargs.pop("num_classes"), **kwargs)


def test_knn_on_separable_clusters_and_on_noise():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 5
  train_labels = np.repeat(np.arange(4), 50)
  train = centres[train_labels] + rng.normal(size=(200, 16))
  test_labels = np.repeat(np.arange(4), 10)
  test = centres[test_labels] + rng.normal(size=(40, 16))
  good = _knn(train, train_labels, test, test_labels, num_classes=4, k=20)
  assert good["top1"] == 1.0
  shuffled = _knn(train, rng.permutation(train_labels), test, test_labels, num_classes=4, k=20,
                  chunk=7)
  assert shuffled["top1"] < 0.6


def test_knn_weights_favour_closer_neighbours():
  """With k=3: one very close neighbour of class 1 outvotes two distant ones of class 0."""
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
  labels = np.array([1, 0, 0])
  test = np.array([[1.0, 0.05]])
  acc = _knn(train, labels, test, np.array([1]), num_classes=2, k=3, temperature=0.1)
  assert acc["top1"] == 1.0
  flat = _knn(train, labels, test, np.array([1]), num_classes=2, k=3, temperature=100.0)
  assert flat["top1"] == 0.0  # near-uniform weights: the majority wins


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _dense_votes(test, train, train_labels, temperature, k, num_classes):
  """The single-device kNN byol_jax ran before the bank was sharded: one top_k over the
  whole bank in row order (ties to the lower row), votes through an N x classes one-hot."""
  sims = objectives.l2_normalize(test) @ objectives.l2_normalize(train).T
  top_sims, top_idx = jax.lax.top_k(sims, k)
  onehot = jax.nn.one_hot(train_labels, num_classes)
  return jnp.einsum("tk,tkc->tc", jnp.exp(top_sims / temperature), onehot[top_idx])


def _dense(train, train_labels, test, test_labels, *, num_classes, k, temperature=0.1):
  votes = _dense_votes(jnp.asarray(test, jnp.float32), jnp.asarray(train, jnp.float32),
                       jnp.asarray(train_labels), temperature, min(k, len(train)), num_classes)
  hits = objectives.topk_correct(votes, jnp.asarray(test_labels))
  return {key: int(value) / len(test) for key, value in hits.items()}


@pytest.mark.parametrize("k", [5, 200, 2000])
def test_sharded_knn_equals_one_top_k_over_the_whole_bank_ties_included(k):
  """1 and 8 devices, a bank that does not divide by 8 (padding rows), exact duplicates of
  bank rows under other labels (ties at every rank), a chunk that does not divide the
  queries: the same top-1 and top-5 as the dense single-device kNN, to the last digit."""
  rng = np.random.default_rng(0)
  train = rng.normal(size=(1003, 16)).astype(np.float32)
  train[500:540] = train[0:40]
  train[900:903] = train[0:3]
  train_labels = rng.integers(0, 10, 1003)
  test = rng.normal(size=(301, 16)).astype(np.float32)
  test[:20] = train[:20]  # queries that sit on tied bank rows
  test_labels = rng.integers(0, 10, 301)
  want = _dense(train, train_labels, test, test_labels, num_classes=10, k=k)
  for devices in (jax.devices()[:1], jax.devices()):
    for chunk in (None, 64):
      got = _knn(train, train_labels, test, test_labels, devices, num_classes=10, k=k,
                 chunk=chunk)
      assert got == want, (len(devices), chunk)


def test_tie_break_is_the_lower_position_across_devices():
  """Two bank rows equal to the query, on different devices, with different labels: k=1
  must pick the one earlier in the split (what one top_k over the bank picks)."""
  mesh = parallel.make_mesh()
  bank = np.zeros((16, 2), np.float32)
  bank[:, 1] = 1.0
  bank[3] = bank[12] = [1.0, 0.0]  # rows 3 and 12 sit on devices 1 and 6
  labels = np.zeros(16, int)
  labels[3], labels[12] = 1, 2
  positions, found = knn.nearest(knn.from_arrays(bank, labels, mesh), np.array([[1.0, 0.0]]),
                                 mesh, k=2)
  assert positions.tolist() == [[3, 12]] and found.tolist() == [[1, 2]]


def test_a_bank_smaller_than_the_devices_and_than_k():
  """3 bank rows over 8 devices (five hold only padding) and k=20: the 3 real rows vote."""
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
  labels = np.array([1, 0, 0])
  test = np.array([[1.0, 0.05], [0.0, 1.0]])
  want = _dense(train, labels, test, np.array([1, 0]), num_classes=2, k=20)
  assert _knn(train, labels, test, np.array([1, 0]), num_classes=2, k=20) == want


def test_bfloat16_bank_stays_close_and_the_dtype_is_checked():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(10, 64)) * 0.5
  train_labels = rng.integers(0, 10, 2000)
  test_labels = rng.integers(0, 10, 500)
  train = centres[train_labels] + rng.normal(size=(2000, 64)) * 2
  test = centres[test_labels] + rng.normal(size=(500, 64)) * 2
  f32 = _knn(train, train_labels, test, test_labels, num_classes=10, k=20)
  bf16 = _knn(train, train_labels, test, test_labels, num_classes=10, k=20,
              bank_dtype="bfloat16")
  assert 0.3 < f32["top1"] < 0.99 and abs(bf16["top1"] - f32["top1"]) <= 0.01
  with pytest.raises(ConfigError, match="knn_bank_dtype must be one of"):
    _knn(train, train_labels, test, test_labels, num_classes=10, k=20, bank_dtype="float16")


class _SmallDevice:
  device_kind = "TPU v5 lite"

  def memory_stats(self):
    return {"bytes_limit": 16 * 2**30}


def test_a_bank_that_cannot_fit_ends_in_one_line():
  knn.check_fits(1_281_167, 2048, _SmallDevice(), 256, 200, "float32")  # fits
  with pytest.raises(ConfigError) as error:
    knn.check_fits(1_281_167 * 20, 8192, _SmallDevice(), 1, 200, "float32")
  message = str(error.value)
  assert "\n" not in message and "needs" in message and "has 16.00 GiB" in message
  assert "knn_bank_dtype=bfloat16" in message and "knn_train_split" in message


def test_probe_accuracy_top1_top5():
  logits = np.eye(6)[[0, 1, 2, 3]] + 0.01 * np.arange(6)
  labels = np.array([0, 2, 5, -1])
  acc = evaluation.probe_accuracy(logits, labels)
  assert acc["top1"] == 1 / 3
  assert acc["top5"] == 1.0
  masked = evaluation.probe_accuracy(logits, labels, np.array([True, False, True, True]))
  assert masked == {"top1": 0.5, "top5": 1.0}


def test_projection_spread_detects_collapse():
  rng = np.random.default_rng(1)
  spread = evaluation.projection_spread(rng.normal(size=(512, 64)))
  collapsed = evaluation.projection_spread(np.ones((512, 64)) + 1e-4 * rng.normal(size=(512, 64)))
  assert 0.9 < spread < 1.1
  assert collapsed < 0.01
  rows = rng.normal(size=(512, 64))
  padded = np.concatenate([rows, np.ones((8, 64))])
  assert evaluation.projection_spread(padded, np.arange(520) < 512) == pytest.approx(
      evaluation.projection_spread(rows), rel=1e-6)


def _watch(rows, **kwargs):
  watch = evaluation.CollapseWatch("REMEDY.", **kwargs)
  return [line for step, metrics in rows if (line := watch(step, metrics))]


def test_collapse_watch_is_quiet_while_the_spread_holds():
  # Seed 0 of the lower-lr demo recipe: a rise, then wobbles within 20% of its best.
  spreads = [0.66, 0.67, 0.69, 0.71, 0.73, 0.72, 0.73, 0.70, 0.71, 0.62]
  assert _watch([(100 * (i + 1), {"projection_std": s}) for i, s in enumerate(spreads)]) == []


def test_collapse_watch_says_once_where_the_spread_fell_and_what_to_do(caplog):
  # Seed 0 of the recipe: best 0.71 at step 300, 0.54 at step 1200.
  spreads = {100: 0.66, 200: 0.58, 300: 0.71, 600: 0.65, 1200: 0.54, 1300: 0.57, 2000: 0.50}
  rows = [(step, {"projection_std": s, "loss": 1.0}) for step, s in spreads.items()]
  rows.insert(3, (500, {"eval/projection_std": 0.6}))
  lines = _watch(rows + [(2000, {"eval/projection_std": 0.45})])
  assert lines == [
      "collapse monitor: at step 1200 the training batches' projection spread fell to 0.54, "
      "from 0.71 at step 300: the projections are losing dimensions (a partial collapse). "
      "REMEDY.",
      "collapse monitor: at step 2000 the test projections' spread fell to 0.45, from 0.60 at "
      "step 500: the projections are losing dimensions (a partial collapse). REMEDY."]
  assert lines[0] in caplog.text
  assert _watch(rows, fall=0.7) == []  # 0.54 is above 0.7 x 0.71


def test_splits_smaller_than_the_devices_give_one_device_s_numbers(tiny_run):
  """5 test and 13 train images over 8 devices, in batches of 16 (mostly padding rows):
  the same metrics as on one device."""
  from byol_jax.train import checkpoint, train_step  # pylint: disable=g-import-not-at-top
  workdir, config = tiny_run
  config = config.copy_and_resolve_references()
  config.eval.batch_size, config.data.test_split = 16, "test[:5]"
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    loaded, nets, params, state = checkpoint.load_pretrained(config, workdir, mesh)
    results.append(evaluation.evaluate_on_splits(
        loaded, train_step.make_embed_fn(nets, mesh), params, state, mesh,
        train_split="train[:13]"))
  one, eight = results
  assert one["eval/test_examples"] == eight["eval/test_examples"] == 5
  assert one["eval/knn_train_examples"] == eight["eval/knn_train_examples"] == 13
  for key in ("eval/knn_top1", "eval/knn_top5", "eval/probe_top1", "eval/probe_top5"):
    assert one[key] == eight[key], key
  assert one["eval/projection_std"] == pytest.approx(eight["eval/projection_std"], rel=1e-5)
