r"""Host CPU per step and step time: the tf.data host crop against the in-memory device crop.

For each of --sizes it takes --num_images images of the embedded CIFAR-10 demo
(resized with PIL when the size is not 32) in two forms, and trains the demo's
network (half-width ResNet-18 by default) on each:

* `tf.data`: a zip of JPEGs; the host decodes, crops, resizes and flips
  (`input_pipeline` over a folder source), the step gets two host views;
* `arrays`: the same images as uint8 arrays (an .npz source); the host only
  gathers rows and the step cuts both views (`device_crop`).

For each it prints, as soon as measured:

* host_cpu_ms_per_batch / host_wall_ms_per_batch: the pipeline alone, --batches
  batches after a warm-up one (this process's CPU time, all threads);
* step_wall_ms / step_cpu_ms: the update step alone on one fixed batch;
* loop_wall_ms / loop_cpu_ms: --batches steps fed by the pipeline. On this CPU the
  pipeline and the step share the cores; on an accelerator only the host figures
  compete with the step for the host.

  python benchmarks/bench_input_paths.py --sizes=32,96 --batches=3
"""

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

PATHS = ("tf.data", "arrays")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="32,96", help="image sides, comma-separated")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--base_channels", type=int, default=16, help="the demo net's stem width")
  parser.add_argument("--num_images", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=3, help="timed batches / steps per figure")
  return parser.parse_args(argv)


def make_data(size: int, num_images: int, folder: str):
  """The first demo images at `size` px: (zip of JPEGs, .npz of uint8 arrays)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from byol_jax.data import datasets  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(datasets.DEMO_ASSET) as demo:
    names = sorted(n for n in demo.namelist() if n.startswith("train/") and n.endswith(".jpg"))
    names = names[:: max(1, len(names) // num_images)][:num_images]  # every class
    images = [Image.open(io.BytesIO(demo.read(n))).convert("RGB") for n in names]
  if size != 32:
    images = [im.resize((size, size), Image.BICUBIC) for im in images]
  zip_path, npz_path = os.path.join(folder, f"{size}.zip"), os.path.join(folder, f"{size}.npz")
  with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as out:
    for name, im in zip(names, images):
      buffer = io.BytesIO()
      im.save(buffer, "JPEG", quality=90)
      out.writestr(name, buffer.getvalue())
  classes = sorted({n.split("/")[1] for n in names})
  np.savez(npz_path, train_images=np.stack([np.asarray(im) for im in images]),
           train_labels=np.asarray([classes.index(n.split("/")[1]) for n in names]))
  return zip_path, npz_path


def path_config(args, size: int, path: str, data: str):
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load("demo")
  config.batch_size = args.batch_size
  config.model.base_channels = args.base_channels
  config.data.update(dict(image_size=size, train_split="train", path=data,
                          source="folder" if path == "tf.data" else "npz"))
  config.augment.crop_on = "host" if path == "tf.data" else "device"
  config.steps, config.warmup_steps = 1000, 10
  return config_lib.finalize(config, num_train_examples=args.num_images, num_classes=10)


def per_call(fn, count: int):
  """(wall, CPU) milliseconds per call of fn over `count` calls."""
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(count):
    fn()
  return ((time.perf_counter() - start) * 1e3 / count, (time.process_time() - cpu) * 1e3 / count)


def measure(args, size: int, path: str, data: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import bench_step  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from byol_jax.data import input_pipeline
  from byol_jax.model import networks
  from byol_jax.train import optim, parallel, train_step
  config = path_config(args, size, path, data)
  mesh = parallel.make_mesh(jax.devices()[:1])
  batches = input_pipeline.pretrain_batches(config, start_step=0, process_index=0,
                                            process_count=1)
  first = next(batches)  # warm-up: builds the pipeline
  figures = {}

  def show(key, value):
    figures[key] = value
    print(f"{size:>4} px  {path:<8} {key:<24} {value:9.2f}", flush=True)

  host_wall, host_cpu = per_call(lambda: next(batches), args.batches)
  show("host_cpu_ms_per_batch", host_cpu)
  show("host_wall_ms_per_batch", host_wall)

  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = optim.make_optimizer(config)
  state = jax.jit(lambda: train_step.init_state(config, nets, optimizer, (size, size, 3), 0),
                  out_shardings=parallel.replicated(mesh))()
  update = train_step.make_update_fn(config, nets, optimizer, mesh,
                                     bench_step.make_augment(config))
  batch = parallel.to_global(first, mesh)
  holder = [update(state, batch)[0]]  # compiles

  def step(local=None):
    holder[0], metrics = update(holder[0], batch if local is None else
                                parallel.to_global(local, mesh))
    jax.block_until_ready(metrics)

  step_wall, step_cpu = per_call(step, args.batches)
  show("step_wall_ms", step_wall)
  show("step_cpu_ms", step_cpu)
  loop_wall, loop_cpu = per_call(lambda: step(next(batches)), args.batches)
  show("loop_wall_ms", loop_wall)
  show("loop_cpu_ms", loop_cpu)
  return figures


def main(argv=None):
  args = parse_args(argv)
  print(f"load average: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as folder:
    for size in (int(s) for s in args.sizes.split(",")):
      zip_path, npz_path = make_data(size, args.num_images, folder)
      for path, data in zip(PATHS, (zip_path, npz_path)):
        results[(size, path)] = measure(args, size, path, data)
  print(f"load average: {os.getloadavg()[0]:.2f}", flush=True)
  keys = ("host_cpu_ms_per_batch", "step_wall_ms", "step_cpu_ms", "loop_wall_ms", "loop_cpu_ms")
  print(f"{'size':>4} {'path':<8} " + " ".join(f"{k:>21}" for k in keys))
  for (size, path), figures in results.items():
    print(f"{size:>4} {path:<8} " + " ".join(f"{figures[k]:>21.1f}" for k in keys))
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
