r"""Rebuilds byol_jax/assets/cifar10_demo.zip from the shared CIFAR-10 JPEG zip.

  python benchmarks/make_demo_assets.py [--shared ../shared/data] [--train_per_class 360]
      [--test_per_class 90]

Takes the first N train and M test JPEGs of every class (file names 0000...,
i.e. the original CIFAR-10 order within each class) from
<shared>/cifar10/cifar10_jpeg.zip and copies their bytes unchanged into a
stored (uncompressed) zip with the same train/<class>/NNNN.jpg and
test/<class>/NNNN.jpg layout. Entries are written in sorted order with a fixed
timestamp, so the output is byte-identical on every rebuild.
"""

import argparse
import hashlib
import os
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
OUTPUT = os.path.join(REPO, "byol_jax", "assets", "cifar10_demo.zip")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def selected_names(train_per_class: int, test_per_class: int):
  names = []
  for split, count in (("train", train_per_class), ("test", test_per_class)):
    for cls in CLASSES:
      names.extend(f"{split}/{cls}/{i:04d}.jpg" for i in range(count))
  return sorted(names)


def build(shared: str, output: str, train_per_class: int, test_per_class: int) -> str:
  source = os.path.join(shared, "cifar10", "cifar10_jpeg.zip")
  if not os.path.exists(source):
    raise SystemExit(f"{source} not found; pass --shared pointing at the shared data folder.")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  tmp = output + ".tmp"
  with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
    for name in selected_names(train_per_class, test_per_class):
      info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
      info.external_attr = 0o644 << 16
      dst.writestr(info, src.read(name), compress_type=zipfile.ZIP_STORED)
  os.replace(tmp, output)
  with open(output, "rb") as f:
    return hashlib.md5(f.read()).hexdigest()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shared", default=DEFAULT_SHARED, help="the shared data folder")
  parser.add_argument("--output", default=OUTPUT)
  parser.add_argument("--train_per_class", type=int, default=360)
  parser.add_argument("--test_per_class", type=int, default=90)
  args = parser.parse_args()
  md5 = build(args.shared, args.output, args.train_per_class, args.test_per_class)
  print(f"wrote {args.output}: {os.path.getsize(args.output):,} bytes, md5 {md5}, "
        f"{10 * (args.train_per_class + args.test_per_class)} images")


if __name__ == "__main__":
  main()
