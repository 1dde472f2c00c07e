"""Data sources: folder / zip trees, the demo asset, the real CIFAR-10 zip and TFDS."""

import contextlib
import csv
import io
import logging
import os
import signal
import zipfile

import numpy as np
import pytest
from PIL import Image

from byol_jax import tf_import
from byol_jax.configs import base
from byol_jax.data import datasets, input_pipeline, sources, tfds_source
from byol_jax.views import host_augment


def make_config(source="folder", path=None, size=16, **data):
  c = base.get_base_config()
  c.batch_size = 8
  c.data.source = source
  c.data.path = None if path is None else str(path)
  c.data.image_size = size
  c.data.eval_crop_fraction = 1.0
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.update(data)
  return c


def pixels(images: np.ndarray) -> np.ndarray:
  """Views as float 0..255, whichever dtype the config's resize ships them in."""
  return images.astype(np.float64) * (1.0 if images.dtype == np.uint8 else 255.0)


def view_dtype(config):
  return host_augment.VIEW_DTYPES[base.resolve_augment(config.augment)["resize"]]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def rgb(seed, size=(20, 24)):
  array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  return Image.fromarray(array)


def write(root, relpath, data: bytes):
  path = os.path.join(root, relpath)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def zip_tree(root, zip_path, wrapper=""):
  with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:  # compressed members
    for dirpath, _, files in os.walk(root):
      for name in files:
        full = os.path.join(dirpath, name)
        zf.write(full, wrapper + os.path.relpath(full, root).replace(os.sep, "/"))


@contextlib.contextmanager
def time_limit(seconds):
  """Fails the test instead of hanging (e.g. should TFDS ever try the network)."""

  def fail(signum, frame):
    raise TimeoutError(f"took more than {seconds} s")

  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------
# Folder and zip trees.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
  """train/{cat,dog,eel}/ and test/{cat,dog}/ (test lacks a class on purpose)."""
  root = tmp_path_factory.mktemp("classes")
  for split, classes, count in (("train", ("dog", "cat", "eel"), 4), ("test", ("cat", "dog"), 2)):
    for ci, cls in enumerate(classes):
      for i in range(count):
        fmt = "PNG" if i % 2 else "JPEG"
        ext = "png" if i % 2 else "jpg"
        write(root, f"{split}/{cls}/{i}.{ext}", encode(rgb(100 * ci + i), fmt))
  write(root, "train/README.txt", b"not an image")
  write(root, "train/.hidden.jpg", b"garbage")
  return root


def test_class_folders_give_sorted_labels(class_tree):
  train = datasets.load_source(make_config(path=class_tree), "train")
  assert train.class_names == ("cat", "dog", "eel") and train.num_classes == 3
  np.testing.assert_array_equal(train.labels, [0] * 4 + [1] * 4 + [2] * 4)
  test = datasets.load_source(make_config(path=class_tree), "test")
  # The class mapping is shared by the splits, although test has no "eel".
  assert test.class_names == ("cat", "dog", "eel")
  np.testing.assert_array_equal(test.labels, [0, 0, 1, 1])
  assert datasets.dataset_info(make_config(path=class_tree), "train") == (12, 3)


def test_zip_matches_directory(class_tree, tmp_path):
  zip_path = tmp_path / "tree.zip"
  zip_tree(class_tree, zip_path, wrapper="mydata/")  # a wrapper folder is unwrapped
  cfg_dir, cfg_zip = make_config(path=class_tree), make_config(path=zip_path)
  for split in ("train", "test"):
    a, b = datasets.load_source(cfg_dir, split), datasets.load_source(cfg_zip, split)
    np.testing.assert_array_equal(a.labels, b.labels)
  batch_dir = next(input_pipeline.eval_batches(cfg_dir, "train", batch_size=12, process_index=0,
                                               process_count=1))
  batch_zip = next(input_pipeline.eval_batches(cfg_zip, "train", batch_size=12, process_index=0,
                                               process_count=1))
  np.testing.assert_array_equal(batch_dir["image"], batch_zip["image"])
  np.testing.assert_array_equal(batch_dir["label"], batch_zip["label"])


def test_missing_split_folder_is_a_clear_error(class_tree):
  with pytest.raises(sources.DataSourceError, match=r"split folders \['test', 'train'\].*"
                     r"'validation'"):
    datasets.load_source(make_config(path=class_tree), "validation")


def test_slices_are_disjoint_and_cover(class_tree):
  cfg = make_config(path=class_tree)
  head = datasets.load_source(cfg, "train[:25%]")
  tail = datasets.load_source(cfg, "train[25%:]")
  assert head.num_examples == 3 and tail.num_examples == 9
  # Recover which files were chosen from the decoded pixels.
  def images(split):
    batch = next(input_pipeline.eval_batches(cfg, split, batch_size=12, process_index=0,
                                             process_count=1))
    return {batch["image"][i].tobytes() for i in np.flatnonzero(batch["mask"])}
  everything, a, b = images("train"), images("train[:25%]"), images("train[25%:]")
  assert not a & b and a | b == everything


def test_tree_without_split_or_class_folders(tmp_path):
  for i in range(5):
    write(tmp_path, f"img{i}.png", encode(rgb(i), "PNG"))
  source = datasets.load_source(make_config(path=tmp_path), "train")
  assert source.num_examples == 5 and source.num_classes == 0
  assert (source.labels == -1).all()


def test_unlabelled_split_beside_labelled_ones(tmp_path):
  """STL-10 style: train/<class>/ plus unlabelled/ with loose images."""
  for cls in ("a", "b"):
    write(tmp_path, f"train/{cls}/0.png", encode(rgb(len(cls)), "PNG"))
  for i in range(3):
    write(tmp_path, f"unlabelled/{i}.png", encode(rgb(10 + i), "PNG"))
  source = datasets.load_source(make_config(path=tmp_path), "unlabelled")
  assert source.num_examples == 3 and source.num_classes == 2
  assert (source.labels == -1).all()


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
  """One class folder with every awkward kind of file."""
  root = tmp_path_factory.mktemp("odd")
  good = rgb(1, (40, 30))
  jpeg = encode(good, "JPEG", quality=90)
  files = {
      "plain.jpg": jpeg,
      "gray.png": encode(good.convert("L"), "PNG"),
      "cmyk.jpg": encode(good.convert("CMYK"), "JPEG", quality=90),
      "rgba.png": encode(good.convert("RGBA"), "PNG"),
      "palette.png": encode(good.convert("P"), "PNG"),
      "tiny.png": encode(rgb(2, (5, 5)), "PNG"),
      "deep.png": encode(Image.fromarray(
          (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)), "PNG"),
      "scan.tif": encode(good, "TIFF"),
      "disguised.jpg": encode(good, "PNG"),  # a PNG with a .jpg name
      "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
      "truncated.jpg": jpeg[: len(jpeg) // 2],
      "empty.png": b"",
  }
  for name, data in files.items():
    write(root, f"things/{name}", data)
  return root


def test_awkward_files_are_converted_or_skipped(odd_tree, caplog):
  caplog.set_level(logging.INFO)
  cfg = make_config(path=odd_tree, size=12)
  source = datasets.load_source(cfg, "train")
  assert source.num_skipped == 3  # corrupt, truncated, empty
  assert source.num_examples == 9
  assert sorted(source.skipped_names) == [f"things/{n}" for n in ("corrupt.jpg", "empty.png",
                                                                   "truncated.jpg")]
  assert len(source.names) == 9 and "things/scan.tif" in source.names
  assert "skipped 3 undecodable" in caplog.text
  batch = next(input_pipeline.eval_batches(cfg, "train", batch_size=10, process_index=0,
                                           process_count=1))
  images = batch["image"][batch["mask"]]
  assert images.shape == (9, 12, 12, 3) and images.dtype == view_dtype(cfg)
  # Every kept image decoded to real content, not to a blank fallback.
  assert (pixels(images).reshape(9, -1).std(axis=1) > 5).all()
  views = next(input_pipeline.pretrain_batches(cfg, start_step=0, process_index=0,
                                               process_count=1))
  assert views["view1"].shape == (8, 12, 12, 3)


def test_skipping_without_start_up_verification(odd_tree):
  """verify_images='none': only TIFF is converted up front; bad files drop out at run time."""
  cfg = make_config(path=odd_tree, size=12, verify_images="none")
  source = datasets.load_source(cfg, "train")
  assert not source.verified and source.num_examples == 12
  views = next(input_pipeline.pretrain_batches(cfg, start_step=0, process_index=0,
                                               process_count=1))
  assert views["view1"].shape == (8, 12, 12, 3)


def test_missing_path_and_empty_folder_errors(tmp_path):
  with pytest.raises(sources.DataSourceError, match="does not exist"):
    datasets.load_source(make_config(path=tmp_path / "nope"), "train")
  write(tmp_path, "notes.txt", b"hello")
  write(tmp_path, "other.zip", b"PK")
  with pytest.raises(sources.DataSourceError, match=r"No images found.*other\.zip"):
    datasets.load_source(make_config(path=tmp_path), "train")
  with pytest.raises(sources.DataSourceError, match="needs data.path"):
    datasets.load_source(make_config(path=None), "train")
  with pytest.raises(sources.DataSourceError, match="Unknown data.source"):
    datasets.load_source(make_config(source="s3"), "train")
  write(tmp_path, "fake.zip", b"not a zip")
  with pytest.raises(sources.DataSourceError, match="not a zip"):
    datasets.load_source(make_config(path=tmp_path / "fake.zip"), "train")


def test_empty_slice_is_a_clear_error(class_tree):
  with pytest.raises(sources.DataSourceError, match="selects no images"):
    datasets.load_source(make_config(path=class_tree), "train[100:]")


def test_parse_split():
  assert sources.parse_split("train") == ("train", None, None)
  assert sources.parse_split("train[10000:]") == ("train", "10000", "")
  assert sources.parse_split("train[:10%]") == ("train", "", "10%")
  with pytest.raises(sources.DataSourceError, match="Cannot parse"):
    sources.parse_split("train[5]")


# ---------------------------------------------------------------------------
# The embedded demo and the real CIFAR-10.
# ---------------------------------------------------------------------------

def test_demo_source():
  cfg = make_config(source="demo", size=32)
  assert datasets.dataset_info(cfg, "train") == (3600, 10)
  assert datasets.dataset_info(cfg, "test") == (900, 10)
  assert os.path.getsize(datasets.DEMO_ASSET) < 5.5e6


@pytest.fixture(scope="module")
def cifar(shared_cifar10):
  cfg = make_config(path=shared_cifar10 / "cifar10_jpeg.zip", size=32)
  with open(shared_cifar10 / "cifar10_index.csv") as f:
    rows = list(csv.DictReader(f))
  return cfg, rows


def test_real_cifar10_zip_counts_and_classes(cifar):
  cfg, rows = cifar
  train = datasets.load_source(cfg, "train")
  test = datasets.load_source(cfg, "test")
  assert (train.num_examples, test.num_examples) == (50_000, 10_000)
  assert train.num_classes == 10 and train.num_skipped == 0
  # Sorted folder names give CIFAR-10's own label numbering.
  names = {int(r["label"]): r["label_name"] for r in rows}
  assert train.class_names == tuple(names[i] for i in range(10))
  np.testing.assert_array_equal(np.bincount(train.labels), [5000] * 10)
  # Examples are in sorted path order: the label of each path matches the CSV.
  for split, source in (("train", train), ("test", test)):
    paths = sorted(r["jpeg_path"] for r in rows if r["split"] == split)
    by_path = {r["jpeg_path"]: int(r["label"]) for r in rows}
    np.testing.assert_array_equal(source.labels, [by_path[p] for p in paths])


def test_real_cifar10_pixels_match_the_originals(cifar, shared_cifar10):
  """Decoded images match the pixel-exact originals (JPEG q75 error only)."""
  cfg, rows = cifar
  batch = next(input_pipeline.eval_batches(cfg, "test", batch_size=16, process_index=0,
                                           process_count=1))
  assert batch["mask"].all() and (batch["label"] == 0).all()  # test/airplane/0000..0015
  exact = np.load(shared_cifar10 / "cifar10_exact_subset.npz")
  in_test = exact["batch"] == 6
  airplanes = exact["images"][in_test & (exact["labels"] == 0)]
  # test/airplane/NNNN.jpg is the NNNN-th airplane of test_batch in original order.
  n = min(16, len(airplanes))
  errors = np.abs(pixels(batch["image"][:n]) - airplanes[:n]).mean(axis=(1, 2, 3))
  assert errors.max() < 15  # README: mean 5.8, worst 13; a wrong image gives > 25
  shuffled = np.abs(pixels(batch["image"][:n]) - airplanes[1:n + 1]).mean(axis=(1, 2, 3))
  assert shuffled.min() > 20


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------

@pytest.fixture
def tfds():
  tf_import.import_tensorflow()
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  return tensorflow_datasets


def test_tfds_mock_data_batches(tfds, tmp_path):
  cfg = make_config(source="tfds", name="cifar10", data_dir=str(tmp_path), size=24)
  with time_limit(240), tfds.testing.mock_data(num_examples=20):
    tfds_source.tfds_source.cache_clear()
    assert datasets.dataset_info(cfg, "train") == (20, 10)
    batch = next(input_pipeline.pretrain_batches(cfg, start_step=0, process_index=0,
                                                 process_count=1))
    ev = list(input_pipeline.eval_batches(cfg, "test", batch_size=8, process_index=0,
                                          process_count=1))
  tfds_source.tfds_source.cache_clear()
  assert batch["view1"].shape == (8, 24, 24, 3) and batch["view1"].dtype == view_dtype(cfg)
  assert batch["label"].dtype == np.int32 and ((batch["label"] >= 0) & (batch["label"] < 10)).all()
  assert len(ev) == 3 and ev[-1]["mask"].sum() == 4


def test_tfds_source_decoded_for_the_device_crop(tfds, tmp_path):
  """A small TFDS split (e.g. STL-10) can go the in-memory way when TF is there."""
  cfg = make_config(source="tfds", name="cifar10", data_dir=str(tmp_path), size=24)
  cfg.augment.crop_on = "device"
  with time_limit(240), tfds.testing.mock_data(num_examples=20):
    tfds_source.tfds_source.cache_clear()
    source = datasets.load_source(cfg, "train")
    batch = next(input_pipeline.pretrain_batches(cfg, start_step=0, process_index=0,
                                                 process_count=1))
  tfds_source.tfds_source.cache_clear()
  assert isinstance(source, sources.ArraySource) and source.images.shape == (20, 32, 32, 3)
  assert set(batch) == {"image", "crop_seed", "label"} and batch["image"].shape == (8, 32, 32, 3)


def test_tfds_mock_random_size_images(tfds, tmp_path):
  """imagenette has variable-size images; mock_data makes small random ones."""
  cfg = make_config(source="tfds", name="imagenette", data_dir=str(tmp_path), size=20)
  with time_limit(240), tfds.testing.mock_data(num_examples=10):
    tfds_source.tfds_source.cache_clear()
    batch = next(input_pipeline.linear_train_batches(cfg, batch_size=4, start_step=0,
                                                     process_index=0, process_count=1))
  tfds_source.tfds_source.cache_clear()
  assert batch["image"].shape == (4, 20, 20, 3)


def test_tfds_not_prepared_errors_say_how_to_prepare(tfds, tmp_path):
  tfds_source.tfds_source.cache_clear()
  with time_limit(120):
    with pytest.raises(sources.DataSourceError, match=r"not available offline.*tfds build cifar10"):
      datasets.dataset_info(make_config(source="tfds", name="cifar10", data_dir=str(tmp_path)),
                            "train")
    with pytest.raises(sources.DataSourceError,
                       match=r"manual download.*ILSVRC2012_img_train\.tar.*downloads/manual"):
      datasets.dataset_info(make_config(source="tfds", name="imagenet2012",
                                        data_dir=str(tmp_path)), "train")
    with pytest.raises(sources.DataSourceError, match="does not know the dataset"):
      datasets.dataset_info(make_config(source="tfds", name="no_such_dataset_xyz",
                                        data_dir=str(tmp_path)), "train")


# ---------------------------------------------------------------------------
# In-memory arrays: .npz files and sources decoded for the device crop.
# ---------------------------------------------------------------------------

def test_decoded_folder_keeps_the_names_of_its_images_and_of_the_skipped(tmp_path):
  for i in range(3):
    write(tmp_path, f"cats/{i}.png", encode(rgb(i, (6, 5)), "PNG"))
  write(tmp_path, "cats/1b.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
  cfg = make_config(path=tmp_path)
  cfg.augment.crop_on = "device"
  source = datasets.load_source(cfg, "train")
  assert isinstance(source, sources.ArraySource) and source.images.shape == (3, 5, 6, 3)
  assert source.names == ("cats/0.png", "cats/1.png", "cats/2.png")
  assert source.skipped_names == ("cats/1b.jpg",) and source.num_skipped == 1


def test_npz_splits_labels_and_slices(tmp_path):
  rng = np.random.default_rng(0)
  train, test = (rng.integers(0, 256, (n, 6, 5, 3), np.uint8) for n in (20, 7))
  path = tmp_path / "d.npz"
  np.savez(path, train_images=train, train_labels=np.arange(20) % 4, test_images=test,
           test_labels=np.full(7, 6))
  cfg = make_config(source="npz", path=path)
  a = datasets.load_source(cfg, "train")
  assert isinstance(a, sources.ArraySource) and a.images.shape == (20, 6, 5, 3)
  np.testing.assert_array_equal(a.images, train)
  assert a.num_classes == 7  # over every split's labels, so train and test agree
  assert datasets.dataset_info(cfg, "test") == (7, 7)
  head, tail = datasets.load_source(cfg, "train[:25%]"), datasets.load_source(cfg, "train[25%:]")
  assert head.num_examples == 5 and tail.num_examples == 15
  together = np.concatenate([head.images, tail.images]).reshape(20, -1)
  assert len({row.tobytes() for row in together}) == 20  # disjoint, and they cover
  with pytest.raises(sources.DataSourceError, match=r"no 'val_images'.*\['test', 'train'\]"):
    datasets.load_source(cfg, "val")


def test_npz_shared_images_and_errors(tmp_path):
  path = tmp_path / "shared.npz"
  np.savez(path, images=np.zeros((4, 3, 3, 3), np.uint8))
  source = datasets.load_source(make_config(source="npz", path=path), "anything")
  assert source.num_examples == 4 and (source.labels == -1).all() and source.num_classes == 0
  bad = tmp_path / "bad.npz"
  np.savez(bad, images=np.zeros((4, 3, 3), np.float32))
  with pytest.raises(sources.DataSourceError, match=r"float32 \[4, 3, 3\].*uint8 \[N, H, W, 3\]"):
    datasets.load_source(make_config(source="npz", path=bad), "train")
  pairs = tmp_path / "pairs.npz"
  np.savez(pairs, images=np.zeros((4, 3, 3, 3), np.uint8), labels=np.zeros(3))
  with pytest.raises(sources.DataSourceError, match="3 labels for 4 images"):
    datasets.load_source(make_config(source="npz", path=pairs), "train")
  with pytest.raises(sources.DataSourceError, match="is not a file"):
    datasets.load_source(make_config(source="npz", path=tmp_path / "none.npz"), "train")
  with pytest.raises(sources.DataSourceError, match="needs data.path"):
    datasets.load_source(make_config(source="npz"), "train")


def test_crop_on_choices():
  cfg = make_config(source="npz")
  assert datasets.crop_on_device(cfg)
  cfg.augment.crop_on = "host"
  with pytest.raises(sources.DataSourceError, match="npz.*crop_on=auto or device"):
    datasets.crop_on_device(cfg)
  folder = make_config(source="folder")
  assert not datasets.crop_on_device(folder)  # TensorFlow is installed here
  folder.augment.crop_on = "device"
  assert datasets.crop_on_device(folder)
  folder.augment.crop_on = "gpu"
  with pytest.raises(sources.DataSourceError, match="crop_on must be one of auto, host, device"):
    datasets.crop_on_device(folder)


def test_demo_decoded_for_the_device_matches_the_host_pipeline():
  cfg = make_config(source="demo", size=32)
  cfg.augment.crop_on = "device"
  arrays = datasets.load_source(cfg, "test")
  assert isinstance(arrays, sources.ArraySource) and arrays.images.shape == (900, 32, 32, 3)
  assert datasets.dataset_info(cfg, "train") == (3600, 10)
  folder = datasets.load_source(make_config(source="demo", size=32), "test")
  np.testing.assert_array_equal(arrays.labels, folder.labels)
  assert arrays.class_names == folder.class_names
  # PIL's and TF's JPEG decoders agree to within rounding.
  host = next(input_pipeline.eval_batches(make_config(source="demo", size=32), "test",
                                          batch_size=16, process_index=0, process_count=1))
  assert np.abs(pixels(host["image"]) - arrays.images[:16]).mean() < 1.5
