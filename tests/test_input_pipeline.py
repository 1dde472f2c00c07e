"""The pipeline contract: determinism, resume, process sharding, eval padding, subsets.

Every image here is one solid colour that encodes its id, so the id of each
row can be read back from the (cropped, resized, flipped) views. The in-memory
path (an .npz of the same images) must follow exactly the same stream.
"""

import io
import itertools
import os

import numpy as np
import pytest
from PIL import Image

from byol_jax import tf_import
from byol_jax.configs import base
from byol_jax.data import batch as batch_lib
from byol_jax.data import datasets, input_pipeline, sources, stream_index
from byol_jax.views import host_augment

NUM = 36          # examples: 4 classes of 9
PER_CLASS = 9
BATCH = 8         # so batch 4 straddles the first epoch boundary (positions 32..39)


def colour_png(i: int) -> bytes:
  image = Image.new("RGB", (10 + i % 7, 12 + i % 5), (i, 255 - i, 77))
  buffer = io.BytesIO()
  image.save(buffer, "PNG")
  return buffer.getvalue()


def ids_of(images: np.ndarray) -> np.ndarray:
  """Example ids from solid-colour views, uint8 or float in [0, 1] (and a check
  that they are solid)."""
  if images.dtype != np.uint8:
    images = np.round(images.astype(np.float32) * 255)
  flat = images.reshape(len(images), images.shape[1] * images.shape[2], 3)
  assert (flat == flat[:, :1]).all(), "views of solid images must stay solid"
  return flat[:, 0, 0].astype(int)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("ids")
  for i in range(NUM):
    path = os.path.join(root, "train", f"c{i // PER_CLASS}", f"{i:03d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(colour_png(i))
  return root


def make_config(tree, seed=0, batch_size=BATCH):
  c = base.get_base_config()
  c.seed = seed
  c.batch_size = batch_size
  c.data.source = "folder"
  c.data.path = str(tree)
  c.data.train_split = "train"
  c.data.image_size = 8
  c.data.eval_crop_fraction = 1.0
  return c


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def pretrain(cfg, start=0, p=0, count=1, n=6):
  return take(input_pipeline.pretrain_batches(cfg, start_step=start, process_index=p,
                                              process_count=count), n)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_format(tree):
  batch = pretrain(make_config(tree), n=1)[0]
  assert set(batch) == {"view1", "view2", "label"}
  assert batch_lib.pretrain_variant(make_config(tree)) is batch_lib.variant_of(batch)
  assert batch_lib.variant_of(batch) is batch_lib.HOST_VIEWS
  assert batch["view1"].shape == batch["view2"].shape == (BATCH, 8, 8, 3)
  dtype = host_augment.VIEW_DTYPES[base.resolve_augment(make_config(tree).augment)["resize"]]
  assert batch["view1"].dtype == dtype and batch["label"].dtype == np.int32
  ids = ids_of(batch["view1"])
  np.testing.assert_array_equal(ids_of(batch["view2"]), ids)  # two views of one image
  np.testing.assert_array_equal(batch["label"], ids // PER_CLASS)


def test_same_seed_same_batches_other_seed_other_order(tree):
  a, b = pretrain(make_config(tree)), pretrain(make_config(tree))
  assert_batches_equal(a, b)
  c = pretrain(make_config(tree, seed=1))
  assert not np.array_equal(ids_of(a[0]["view1"]), ids_of(c[0]["view1"]))


def test_resume_equals_the_uninterrupted_run(tree):
  cfg = make_config(tree)
  full = pretrain(cfg, n=7)
  for start in (1, 4, 5):  # 4 straddles the epoch boundary
    assert_batches_equal(pretrain(cfg, start=start, n=7 - start), full[start:])


def test_epochs_are_permutations_reshuffled_each_epoch(tree):
  cfg = make_config(tree)
  rows = np.concatenate([ids_of(b["view1"]) for b in pretrain(cfg, n=9)])
  epoch0, epoch1 = rows[:NUM], rows[NUM:2 * NUM]
  assert sorted(epoch0) == list(range(NUM)) and sorted(epoch1) == list(range(NUM))
  assert not np.array_equal(epoch0, epoch1)


def test_process_rows_concatenate_to_the_global_batch(tree):
  cfg = make_config(tree)
  single = pretrain(cfg, n=5)
  for count in (2, 4):
    shards = [pretrain(cfg, p=p, count=count, n=5) for p in range(count)]
    for step in range(5):
      for key in ("view1", "view2", "label"):
        np.testing.assert_array_equal(
            np.concatenate([s[step][key] for s in shards]), single[step][key])
      assert shards[0][step]["view1"].shape[0] == BATCH // count


def test_process_shards_are_disjoint_and_cover_an_epoch(tree):
  cfg = make_config(tree, batch_size=12)  # 3 global batches = exactly one epoch
  seen = [np.concatenate([ids_of(b["view1"]) for b in pretrain(cfg, p=p, count=3, n=3)])
          for p in range(3)]
  for a, b in itertools.combinations(seen, 2):
    assert not set(a) & set(b)
  assert sorted(np.concatenate(seen)) == list(range(NUM))


def test_batch_size_must_divide_by_process_count(tree):
  with pytest.raises(ValueError, match="does not divide by the 3 processes"):
    input_pipeline.pretrain_batches(make_config(tree), start_step=0, process_index=0,
                                    process_count=3)
  with pytest.raises(ValueError, match="does not divide"):
    input_pipeline.eval_batches(make_config(tree), "train", batch_size=10, process_index=0,
                                process_count=4)


def test_host_views_differ_between_views_and_positions(tree):
  """Crops and flips are random per view: use a textured image to see them."""
  root = tree
  cfg = make_config(root)
  cfg.data.path = os.path.join(os.path.dirname(datasets.DEMO_ASSET), "cifar10_demo.zip")
  cfg.data.image_size = 32
  batch = pretrain(cfg, n=1)[0]
  differ = [not np.array_equal(batch["view1"][i], batch["view2"][i]) for i in range(BATCH)]
  assert all(differ)


def test_eval_padding_mask_and_equal_batch_counts(tree):
  cfg = make_config(tree)
  batch_size, count = 16, 2
  per_process = [list(input_pipeline.eval_batches(cfg, "train", batch_size=batch_size,
                                                  process_index=p, process_count=count))
                 for p in range(count)]
  assert [len(b) for b in per_process] == [3, 3]  # ceil(36 / 16)
  ids, labels = [], []
  for step in range(3):
    for p in range(count):
      batch = per_process[p][step]
      assert batch["image"].shape == (8, 8, 8, 3) and batch["mask"].dtype == bool
      valid = batch["mask"]
      ids.extend(ids_of(batch["image"][valid]))
      labels.extend(batch["label"][valid])
      assert (batch["label"][~valid] == -1).all() and (batch["image"][~valid] == 0).all()
  assert ids == list(range(NUM))  # in order, each once, padding excluded
  np.testing.assert_array_equal(labels, np.arange(NUM) // PER_CLASS)
  # 48 rows for 36 examples: the last global batch holds 4 real rows, all on process 0.
  assert per_process[0][2]["mask"].sum() == 4 and per_process[1][2]["mask"].sum() == 0


def test_linear_train_label_fraction_subset(tree):
  cfg = make_config(tree)

  def ids(fraction, seed=0, p=0, count=1):
    cfg.seed = seed
    batches = take(input_pipeline.linear_train_batches(
        cfg, batch_size=8, start_step=0, process_index=p, process_count=count,
        label_fraction=fraction), 6)
    for b in batches:
      assert set(b) == {"image", "label"}
      np.testing.assert_array_equal(b["label"], ids_of(b["image"]) // PER_CLASS)
    return np.concatenate([ids_of(b["image"]) for b in batches])

  subset = set(ids(0.25))
  assert len(subset) == 8  # round(0.25 * 9) = 2 per class
  assert sorted(np.bincount([i // PER_CLASS for i in subset])) == [2, 2, 2, 2]
  assert set(ids(0.25)) == subset and set(ids(0.25, seed=1)) != subset
  assert set(ids(1.0)) == set(range(NUM))
  np.testing.assert_array_equal(
      np.concatenate([ids(0.25, p=0, count=2).reshape(6, 4),
                      ids(0.25, p=1, count=2).reshape(6, 4)], axis=1).ravel(), ids(0.25))


def test_class_balanced_subset_function():
  labels = np.repeat(np.arange(5), [100, 50, 10, 1, 0][:5]).astype(np.int32)
  labels = np.concatenate([labels, np.full(7, -1, np.int32)])
  subset = stream_index.class_balanced_subset(labels, 0.1, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [10, 5, 1, 1])
  with pytest.raises(ValueError, match="label_fraction"):
    stream_index.class_balanced_subset(labels, 0.0, seed=3)


# ---------------------------------------------------------------------------
# Streaming sources (TFDS too large for memory), with an in-memory stand-in.
# ---------------------------------------------------------------------------

class FakeStream(sources.StreamingSource):
  """StreamingSource over in-memory PNGs; sub-splits are "p/P" strided shares."""

  def __init__(self, num):
    super().__init__(description="fake", num_examples=num, num_classes=4)
    self.images = [colour_png(i) for i in range(num)]

  def process_split(self, process_index, process_count):
    return f"{process_index}/{process_count}"

  def _members(self, split):
    p, count = map(int, split.split("/"))
    return list(range(p, self.num_examples, count))

  def split_size(self, split):
    return len(self._members(split))

  def read(self, split):
    tf = tf_import.import_tensorflow()
    members = self._members(split)
    return tf.data.Dataset.from_tensor_slices(
        ([self.images[i] for i in members], np.asarray(members, np.int32) // PER_CLASS))


@pytest.fixture
def stream(monkeypatch):
  fake = FakeStream(37)
  monkeypatch.setattr(datasets, "load_source", lambda config, split: fake)
  return fake


def test_streaming_resume_and_disjoint_shards(tree, stream):
  cfg = make_config(tree)
  cfg.data.shuffle_buffer = 8
  for count in (1, 2):
    local = BATCH // count
    runs = [pretrain(cfg, p=p, count=count, n=8) for p in range(count)]
    for p in range(count):
      # Resume inside the second epoch of this process's share.
      assert_batches_equal(pretrain(cfg, start=5, p=p, count=count, n=3), runs[p][5:])
      first_epoch = np.concatenate([ids_of(b["view1"]) for b in runs[p]])[
          :stream.split_size(stream.process_split(p, count))]
      assert sorted(first_epoch) == stream._members(stream.process_split(p, count))
    if count == 2:
      assert runs[0][0]["view1"].shape[0] == local


def test_streaming_eval_pads_processes_to_equal_counts(tree, stream):
  cfg = make_config(tree)
  per_process = [list(input_pipeline.eval_batches(cfg, "test", batch_size=8, process_index=p,
                                                  process_count=2)) for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 5  # ceil(19 / 4)
  for p, batches in enumerate(per_process):
    ids = np.concatenate([ids_of(b["image"][b["mask"]]) for b in batches])
    assert list(ids) == stream._members(f"{p}/2")
    assert all(b["image"].shape[0] == 4 for b in batches)


# ---------------------------------------------------------------------------
# In-memory arrays: the host gathers rows, the device crops (no TensorFlow).
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  """The tree's 36 examples as one-size uint8 arrays, in the tree's (path) order."""
  images = np.stack([np.full((12, 10, 3), (i, 255 - i, 77), np.uint8) for i in range(NUM)])
  path = tmp_path_factory.mktemp("arrays") / "ids.npz"
  np.savez(path, train_images=images, train_labels=np.arange(NUM) // PER_CLASS)
  return path


def array_config(npz, seed=0, batch_size=BATCH):
  c = make_config(npz, seed, batch_size)
  c.data.source = "npz"
  return c


def test_array_batches_carry_raw_images_and_crop_seeds(npz):
  batch = pretrain(array_config(npz), n=1)[0]
  assert set(batch) == {"image", "crop_seed", "label"}
  assert batch_lib.pretrain_variant(array_config(npz)) is batch_lib.variant_of(batch)
  assert batch_lib.variant_of(batch) is batch_lib.DEVICE_CROP
  assert batch["image"].shape == (BATCH, 12, 10, 3) and batch["image"].dtype == np.uint8
  assert batch["crop_seed"].shape == (BATCH, 2, 2) and batch["crop_seed"].dtype == np.uint32
  np.testing.assert_array_equal(batch["label"], ids_of(batch["image"]) // PER_CLASS)
  seeds = batch["crop_seed"].reshape(-1, 2)
  assert len({tuple(s) for s in seeds}) == 2 * BATCH  # one key per example and view


def test_array_stream_is_the_tf_data_stream(tree, npz):
  """Same order, resume and process shards as tf.data: the index arithmetic is shared."""
  for seed in (0, 1):
    expected = [ids_of(b["view1"]) for b in pretrain(make_config(tree, seed), n=7)]
    full = pretrain(array_config(npz, seed), n=7)
    np.testing.assert_array_equal([ids_of(b["image"]) for b in full], expected)
    assert_batches_equal(pretrain(array_config(npz, seed), start=4, n=3), full[4:])
  full = pretrain(array_config(npz), n=5)
  for count in (2, 4):
    shards = [pretrain(array_config(npz), p=p, count=count, n=5) for p in range(count)]
    for step in range(5):
      for key in ("image", "crop_seed", "label"):
        np.testing.assert_array_equal(
            np.concatenate([s[step][key] for s in shards]), full[step][key])


def test_array_eval_and_linear_batches_match_tf_data(tree, npz):
  kwargs = dict(batch_size=16, process_count=2)
  for p in range(2):
    want = list(input_pipeline.eval_batches(make_config(tree), "train", process_index=p,
                                            **kwargs))
    got = list(input_pipeline.eval_batches(array_config(npz), "train", process_index=p,
                                           **kwargs))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
      assert g["image"].shape == w["image"].shape and g["image"].dtype == w["image"].dtype
      np.testing.assert_array_equal(g["mask"], w["mask"])
      np.testing.assert_array_equal(g["label"], w["label"])
      np.testing.assert_array_equal(ids_of(g["image"]), ids_of(w["image"]))  # padding: 0

  def linear_ids(cfg):
    batches = take(input_pipeline.linear_train_batches(
        cfg, batch_size=8, start_step=2, process_index=1, process_count=2,
        label_fraction=0.25), 4)
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    return np.concatenate([ids_of(b["image"]) for b in batches])

  np.testing.assert_array_equal(linear_ids(array_config(npz)), linear_ids(make_config(tree)))


def test_folder_on_the_device_needs_one_image_size(tree):
  cfg = make_config(tree)
  cfg.augment.crop_on = "device"
  with pytest.raises(sources.DataSourceError, match="images of 35 sizes.*crop_on=host"):
    datasets.load_source(cfg, "train")
