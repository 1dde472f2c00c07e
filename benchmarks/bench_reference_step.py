r"""Speed of DeepMind's reference BYOL update step, timed the way bench_step.py times ours.

The reference (github.com/google-deepmind/deepmind-research, folder byol/) is
read from the checkout --reference_dir names (`reference_import.py`: its shims
for today's jax). Its update step (colour augmentation, two online and two
target forwards, backward, LARS, EMA; the crop is on the host there, as in our
`views` path) runs unchanged.

The step is fed a fixed random batch of float views in [0, 1] (what the
reference's tf.data pipeline yields) through its own `jax.pmap`, on the local
devices. It prints, each as measured: compile time, wall and CPU seconds per
step (median of --steps single steps after one warm-up), images/s, XLA's FLOPs
of the step, and the reference's augmentation alone (`augmentations.postprocess`,
both views, jitted). Compare with

  python benchmarks/bench_step.py --config=resnet50_imagenet --batch_size=16 --steps=3

  python benchmarks/bench_reference_step.py --reference_dir=PATH --batch_size=16 --steps=3
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import reference_import  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference_dir", required=True,
                      help="a deepmind-research checkout: the folder that holds byol/")
  parser.add_argument("--batch_size", type=int, default=16, help="global batch")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--encoder", default="ResNet50",
                      help="a class of the reference's byol/utils/networks.py")
  parser.add_argument("--num_epochs", type=int, default=300,
                      help="picks the reference's lr / weight decay / EMA presets")
  parser.add_argument("--steps", type=int, default=3, help="single steps timed")
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  byol_experiment, byol_config, augmentations = reference_import.import_reference(
      args.reference_dir, "byol_experiment", "configs.byol", "utils.augmentations")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  config = byol_config.get_config(args.num_epochs, args.batch_size)
  config["network_config"]["encoder_class"] = args.encoder
  experiment = reference_import.build(byol_experiment.ByolExperiment, config)

  n = jax.local_device_count()
  if args.batch_size % n:
    raise SystemExit(f"--batch_size={args.batch_size} does not split over {n} devices.")
  b, size = args.batch_size // n, args.image_size
  rng = np.random.default_rng(0)
  inputs = {"view1": rng.random((n, b, size, size, 3), np.float32),
            "view2": rng.random((n, b, size, size, 3), np.float32),
            "labels": rng.integers(0, 1000, (n, b)).astype(np.int32)}
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  fig = bench_step.Figures()
  fig["reference_encoder"] = args.encoder
  fig["batch_size"] = args.batch_size
  fig["image_size"] = size
  fig["devices"] = n
  fig["device_kind"] = jax.devices()[0].device_kind
  fig["jax_version"] = jax.__version__
  fig["cpu_count"] = os.cpu_count()
  fig["load_average_1min_start"] = os.getloadavg()[0]

  init = experiment._make_initial_state  # pylint: disable=protected-access
  state = jax.pmap(init, axis_name="i")(keys, inputs)
  step = np.zeros((n,), np.int32)
  start = time.perf_counter()
  compiled = experiment.update_pmap.lower(state, step, keys, inputs).compile()
  fig["train_compile_s"] = time.perf_counter() - start
  step_flops = bench_step.xla_flops(compiled) * n
  fig["train_step_gflop_xla"] = step_flops / 1e9
  fig["train_gflop_per_image_xla"] = step_flops / args.batch_size / 1e9
  holder = [state]

  def update():
    holder[0], logs = compiled(holder[0], step, keys, inputs)
    return logs

  windows = bench_step.time_call(update, (), 0.0, 1, steps=args.steps)
  step_s, step_cpu_s, fastest_s, slowest_s = bench_step.summarize(windows)
  fig["timing_windows"] = args.steps
  fig["train_step_s"] = step_s
  fig["train_step_s_fastest"] = fastest_s
  fig["train_step_s_slowest"] = slowest_s
  fig["train_images_per_s"] = args.batch_size / step_s
  fig["train_cpu_s_per_step"] = step_cpu_s
  fig["train_images_per_cpu_s"] = args.batch_size / step_cpu_s

  # The reference's whole augmentation (flip, colour, blur, solarize; both views), alone.
  one_device = {k: v[0] for k, v in inputs.items()}
  augment = jax.jit(augmentations.postprocess)
  augment_s = bench_step.summarize(bench_step.time_call(
      augment, (one_device, keys[0]), 0.0, 1, steps=args.steps))[0]
  fig["augment_s"] = augment_s
  fig["augment_share_of_step"] = augment_s / step_s
  fig["peak_host_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  fig["load_average_1min_end"] = os.getloadavg()[0]
  return fig.write(args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
