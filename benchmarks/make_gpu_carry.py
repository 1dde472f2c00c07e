r"""Builds .gpu_carry/: what an accelerator machine without a network needs for
benchmarks/accelerator_run.py (experiments/speed.md gives the call).

* The wheels of the pure-Python packages that machine lacks (it has jax, optax,
  chex, orbax, numpy, pillow, absl, pyyaml, tabulate, tensorboard):
  `WHEELS`, downloaded with pip for Python 3.12 without their dependencies.
* cifar10_subset.npz: --train_per_class / --test_per_class CIFAR-10 images per
  class, decoded from ../shared/data/cifar10/cifar10_jpeg.zip (the first ones
  in path order), as uint8 `train_images` / `test_images` with their labels.

The folder must stay under --max_mib together with the repository's tracked
files: the device tool carries at most 64 MiB a call. .gpu_carry/ is git-ignored.

  python benchmarks/make_gpu_carry.py
"""

import argparse
import io
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY = os.path.join(REPO, ".gpu_carry")
CIFAR_ZIP = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10", "cifar10_jpeg.zip")
# The versions this repository's tests run with; jmp is dm-haiku's own dependency.
WHEELS = ("dm-haiku==0.0.17", "jmp==0.0.4", "ml-collections==1.1.0")
NPZ = "cifar10_subset.npz"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cifar_zip", default=CIFAR_ZIP)
  parser.add_argument("--train_per_class", type=int, default=1500)
  parser.add_argument("--test_per_class", type=int, default=200)
  parser.add_argument("--max_mib", type=float, default=64.0,
                      help="limit on .gpu_carry plus the repository's tracked files")
  return parser.parse_args(argv)


def download_wheels() -> None:
  subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                  "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
                  "--dest", CARRY, *WHEELS], check=True)


def write_cifar_subset(cifar_zip: str, train_per_class: int, test_per_class: int) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.exists(cifar_zip):
    raise SystemExit(f"{cifar_zip} not found; pass --cifar_zip (see ../shared/data/README.md).")
  arrays = {}
  with zipfile.ZipFile(cifar_zip) as zf:
    names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
    classes = sorted({n.split("/")[1] for n in names})  # CIFAR-10's own label order
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
      chosen = [n for c in classes for n in [m for m in names if m.startswith(f"{split}/{c}/")]
                [:per_class]]
      arrays[f"{split}_images"] = np.stack([
          np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in chosen])
      arrays[f"{split}_labels"] = np.asarray([classes.index(n.split("/")[1]) for n in chosen],
                                             np.int32)
  np.savez_compressed(os.path.join(CARRY, NPZ), class_names=np.asarray(classes), **arrays)


def tracked_bytes() -> int:
  files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.split("\0")
  return sum(os.path.getsize(os.path.join(REPO, f)) for f in files
             if f and os.path.isfile(os.path.join(REPO, f)))


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(CARRY, exist_ok=True)
  download_wheels()
  write_cifar_subset(args.cifar_zip, args.train_per_class, args.test_per_class)
  carried = sum(os.path.getsize(os.path.join(CARRY, f)) for f in os.listdir(CARRY))
  total = carried + tracked_bytes()
  for name in sorted(os.listdir(CARRY)):
    print(f"{os.path.getsize(os.path.join(CARRY, name)) / 2**20:8.2f} MiB  .gpu_carry/{name}")
  print(f"{total / 2**20:8.2f} MiB  with the repository's tracked files (limit {args.max_mib})")
  if total > args.max_mib * 2**20:
    raise SystemExit("Over the limit: lower --train_per_class.")


if __name__ == "__main__":
  main(sys.argv[1:])
