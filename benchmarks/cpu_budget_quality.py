r"""CPU-budget learning quality: does BYOL learn anything in ~20 minutes on 2 CPU cores?

It pretrains a narrow ResNet-18 with BYOL on the real CIFAR-10 images of the
shared zip (`$BYOL_SHARED_DATA/cifar10/cifar10_jpeg.zip`, default
`<repo>/../shared/data`), through the library's own runner
(`jobs.run("pretrain", ...)` on the `resnet18_cifar10` recipe with
overrides), and compares the frozen features of

  byol          the BYOL encoder after the budget;
  random        the same architecture at its random initialisation (BYOL's own
                starting point, same seed), with the BN running statistics
                estimated on training images (`readout.random_baseline`, no
                weight changes; the initial state, whose BN averages are
                Haiku's zeros, is reported as `random_init_state`);
  no_predictor  the same recipe and budget with the predictor removed
                (`model.use_predictor=False`, the paper's ablation, which
                collapses).

`--mode=ablations` adds the paper's other ablations (Section 5), each the same
recipe and budget with one change (`ABLATIONS` below):

  tau_one       base_tau=1.0, tau_schedule=constant: the target stays the
                random initial network;
  tau_zero      base_tau=0.0, constant: no moving average, the target is the
                online network's current copy;
  no_head_bn    projector and predictor without BatchNorm (`model.head_norm=False`);
  gn_ws_no_head_bn  no batch statistics anywhere: the encoder on GroupNorm + weight
                standardisation (`model.norm=group_ws`) and heads without BatchNorm,
                the follow-up paper's answer to "does BYOL need batch statistics?";
  torchvision_style / reference_style  the other views than the budget's
                (`--augment_style`, `augment.style`): SimCLR/torchvision or DeepMind's,
                the same budget and seed.

`--mode=views` runs BYOL on DeepMind's views with one part at a time swapped
for torchvision's (`augment.crop=inception`, `augment.color=torchvision`,
`augment.resize=bilinear`), beside both whole styles, on the ablation budget.

The read-out is `byol_jax.evaluate.readout` (shared with the demo's `--job=compare`) on
frozen `embedding` features of centre-cropped images, computed once per
encoder: kNN (cosine, k=200, T=0.1, as in the recipe) and a cheap linear probe
(NOT the paper's protocol: softmax regression on standardised features, L2
weight picked on 10% held out). Train features come from `train[:N]` (a fixed,
class-mixed pseudo-random subset of the train split), test features from
`test[:M]` (M=10000 is the whole test split). It also prints the collapse
monitor (`evaluation.projection_spread`: ~1 for spread-out projections, -> 0
under collapse) for each encoder, the gaps to BYOL, the pretraining curves'
last values, the wall time of each phase and the load average; with --json it
writes all of it.

  python benchmarks/cpu_budget_quality.py --json=cpu_budget.json     # ~20 minutes
  python benchmarks/cpu_budget_quality.py --mode=ablations           # <= 60 minutes
  python benchmarks/cpu_budget_quality.py --mode=views               # ~25 minutes
  python benchmarks/cpu_budget_quality.py --budget=tiny --mode=ablations   # smoke run

Every --budget field can be overridden by its flag.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = os.environ.get("BYOL_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared",
                                                              "data"))
DEFAULT_ZIP = os.path.join(SHARED_DATA, "cifar10", "cifar10_jpeg.zip")
# Pretrained variants: each is the BYOL recipe with these config overrides (the
# paper's ablations, Section 5); "random" is BYOL's starting point, not trained.
ABLATIONS = {
    "byol": {},
    "no_predictor": {"model.use_predictor": False},
    "tau_one": {"base_tau": 1.0, "tau_schedule": "constant"},   # target frozen at random init
    "tau_zero": {"base_tau": 0.0, "tau_schedule": "constant"},  # target = online, no EMA
    "no_head_bn": {"model.head_norm": False},                   # projector/predictor without BN
    "gn_ws_no_head_bn": {"model.norm": "group_ws", "model.head_norm": False},  # no batch stats
    # The other views than the budget's (`--augment_style`); the mode runs the one that differs.
    "reference_style": {"augment.style": "reference"},         # DeepMind's views
    "torchvision_style": {"augment.style": "torchvision"},     # SimCLR-style views
    # DeepMind's views with one part swapped for torchvision's (--mode=views).
    "reference_inception_crop": {"augment.style": "reference", "augment.crop": "inception"},
    "reference_torchvision_color": {"augment.style": "reference", "augment.color": "torchvision"},
    "reference_bilinear_resize": {"augment.style": "reference", "augment.resize": "bilinear"},
}
STYLE_VARIANT = {"reference": "reference_style", "torchvision": "torchvision_style"}
PRETRAINED = tuple(ABLATIONS)
VARIANTS = ("byol", "random", *PRETRAINED[1:])
MODES = {
    "compare": ("byol", "random", "no_predictor"),  # the ~20-minute run
    # The paper's ablations and the other views (<= 60 minutes).
    "ablations": ("byol", "random", "no_predictor", "tau_one", "tau_zero", "no_head_bn",
                  "gn_ws_no_head_bn", "reference_style", "torchvision_style"),
    # Which part of the reference's views costs the most in a short run (~25 minutes).
    "views": ("byol", "reference_inception_crop", "reference_torchvision_color",
              "reference_bilinear_resize", "torchvision_style"),
}

# Pretraining budget and read-out sizes. "full" is the ~20-minute compare run and
# "ablations" the <= 60-minute ablation run recorded in experiments/cpu_budget.md
# (chosen with the pilots listed there); each mode defaults to its own.
_READOUT = dict(train_examples=10000, test_examples=10000, probe_steps=500, bn_batches=20,
                eval_batch=500)
_NETWORK = dict(batch_size=128, base_channels=16, image_size=32, mlp_hidden=1024,
                projection_dim=256, base_lr=0.5, base_tau=0.99)
BUDGETS = {
    "tiny": dict(steps=2, batch_size=16, base_channels=4, image_size=16, mlp_hidden=32,
                 projection_dim=16, base_lr=1.0, base_tau=0.99, warmup_steps=1,
                 augment_style="reference", train_examples=128, test_examples=128,
                 probe_steps=20, bn_batches=2, eval_batch=64),
    "pilot": dict(_NETWORK, steps=120, warmup_steps=12, augment_style="reference",
                  train_examples=5000, test_examples=2000, probe_steps=300, bn_batches=20,
                  eval_batch=500),
    # 1/8 width sees twice the images of 1/4 in the 20 minutes, and the torchvision views:
    # the reference's learn less in one or two epochs (cpu_budget.md).
    "full": dict(_NETWORK, **_READOUT, base_channels=8, steps=1800, warmup_steps=180,
                 augment_style="torchvision"),
    # Eight pretraining runs: 400 steps each, on the reference's views.
    "ablations": dict(_NETWORK, **_READOUT, steps=400, warmup_steps=40, augment_style="reference"),
}
DEFAULT_BUDGET = {"compare": "full", "ablations": "ablations", "views": "ablations"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--budget", default=None, choices=sorted(BUDGETS),
                      help="default: full for --mode=compare, ablations otherwise")
  parser.add_argument("--data", default=DEFAULT_ZIP, help="CIFAR-10 zip (train/ and test/)")
  parser.add_argument("--mode", default="compare", choices=sorted(MODES),
                      help="compare: BYOL, random init, no predictor; ablations: also tau = 1, "
                      "tau = 0, heads without BatchNorm, no batch statistics at all, and "
                      "torchvision-style views; views: the reference's views with one part "
                      "swapped for torchvision's")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of {','.join(VARIANTS)} (default: the mode's)")
  parser.add_argument("--workdir", default=None, help="keep the pretraining runs here "
                      "(default: a temporary folder, deleted at the end)")
  parser.add_argument("--json", default=None, help="write every figure to this file")
  parser.add_argument("--seed", type=int, default=0)
  ints = ("steps", "batch_size", "base_channels", "image_size", "mlp_hidden", "projection_dim",
          "warmup_steps", "train_examples", "test_examples", "probe_steps", "bn_batches",
          "eval_batch")
  for name in ints:
    parser.add_argument(f"--{name}", type=int, default=None)
  for name in ("base_lr", "base_tau", "probe_lr"):
    parser.add_argument(f"--{name}", type=float, default=None)
  parser.add_argument("--augment_style", default=None, choices=sorted(STYLE_VARIANT),
                      help="the views of every variant (default: the budget's)")
  args = parser.parse_args(argv)
  args.budget = args.budget or DEFAULT_BUDGET[args.mode]
  settings = dict(BUDGETS[args.budget], probe_lr=0.01)
  for name in (*ints, "base_lr", "base_tau", "probe_lr", "augment_style"):
    if getattr(args, name) is not None:
      settings[name] = getattr(args, name)
  if args.variants is None:
    variants = [v for v in MODES[args.mode] if v != STYLE_VARIANT[settings["augment_style"]]]
  else:
    variants = [v for v in args.variants.split(",") if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
  if settings["test_examples"] > 10_000:
    parser.error("--test_examples is at most 10000 (the CIFAR-10 test split)")
  return args, settings, variants


def apply_overrides(config, overrides: dict):
  """Sets dotted config fields; one this checkout lacks raises KeyError."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(key)
    node[leaf] = value
  return config


def make_config(settings, data: str, seed: int, variant: str):
  """The resnet18_cifar10 recipe on the shared zip, shrunk to the CPU budget."""
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load("resnet18_cifar10")
  c.seed = seed
  c.data.source = "folder"
  c.data.path = data
  c.data.train_split = "train"
  c.data.val_split = "train[:5000]"
  c.data.test_split = "test"
  c.data.image_size = settings["image_size"]
  c.batch_size = settings["batch_size"]
  c.steps = settings["steps"]
  c.warmup_steps = settings["warmup_steps"]
  c.optimizer.base_lr = settings["base_lr"]
  c.base_tau = settings["base_tau"]
  c.model.base_channels = settings["base_channels"]
  c.model.projector_hidden = c.model.predictor_hidden = settings["mlp_hidden"]
  c.model.projection_dim = settings["projection_dim"]
  c.augment.style = settings["augment_style"]
  c.eval.every_steps = -1                    # read out below, once, on the final encoder
  c.checkpoint.every_steps = settings["steps"]
  c.checkpoint.keep = 1
  c.log_every_steps = max(1, settings["steps"] // 10)
  return apply_overrides(c, ABLATIONS[variant])


def read_out(name, nets, params, state, config, settings, mesh):
  """`readout.read_out` on train[:N] / test[:M], printed as one line."""
  from byol_jax.evaluate import readout  # pylint: disable=g-import-not-at-top
  result = readout.read_out(
      config, nets, params, state, mesh, train_split=f"train[:{settings['train_examples']}]",
      test_split=f"test[:{settings['test_examples']}]", batch_size=settings["eval_batch"],
      probe_steps=settings["probe_steps"], probe_lr=settings["probe_lr"])
  if not result["finite"]:
    print(f"[{name}] non-finite features: no accuracy reported", flush=True)
  else:
    print(f"[{name}] kNN top-1 {result['knn_top1']:.4f} | linear probe top-1 "
          f"{result['probe_top1']:.4f} (wd {result['probe']['weight_decay']:g}) | "
          f"projection_spread {result['projection_spread']:.3f} | embedding_spread "
          f"{result['embedding_spread']:.3f}", flush=True)
  return result


def pretrain_variant(variant, settings, args, root, mesh, report):
  """Pretrains one variant through the runner and reads its encoder out."""
  from byol_jax import jobs  # pylint: disable=g-import-not-at-top
  from byol_jax.main import PREEMPTED_EXIT_CODE  # pylint: disable=g-import-not-at-top
  from byol_jax.train import checkpoint
  config = make_config(settings, args.data, args.seed, variant)
  workdir = os.path.join(root, variant)
  start = time.perf_counter()
  last = jobs.run("pretrain", config, workdir, mesh)
  if "preempted_at_step" in last:
    args.workdir = root  # keeps the saved checkpoint: `run` deletes a temporary root at the end
    print(f"Pretraining of {variant} was preempted at step {last['preempted_at_step']}; the "
          f"benchmark stops here. Rerun it with --workdir={root} to resume.", file=sys.stderr)
    raise SystemExit(PREEMPTED_EXIT_CODE)
  report["seconds"][f"pretrain_{variant}"] = time.perf_counter() - start
  report["pretrain"][variant] = {k: last[k] for k in (
      "byol_loss", "projection_std", "probe_top1", "images_per_s") if k in last}
  start = time.perf_counter()
  final_config, nets, params, net_state = checkpoint.load_pretrained(config, workdir, mesh)
  report["results"][variant] = read_out(variant, nets, params, net_state, final_config,
                                        settings, mesh)
  report["seconds"][f"readout_{variant}"] = time.perf_counter() - start


def random_variants(settings, args, mesh, report):
  """The random-init baseline (BN statistics re-estimated) and the unusable initial state."""
  from byol_jax import config_lib  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluate import readout
  start = time.perf_counter()
  config = config_lib.prepare(make_config(settings, args.data, args.seed, "byol"), mesh)
  init_config, nets, params, state = readout.initial_network(config, mesh)
  report["results"]["random_init_state"] = read_out("random_init_state", nets, params, state,
                                                    init_config, settings, mesh)
  config, nets, params, state = readout.random_baseline(
      config, mesh, bn_split=f"train[:{settings['bn_batches'] * settings['eval_batch']}]",
      batch_size=settings["eval_batch"])
  report["results"]["random"] = read_out("random", nets, params, state, config, settings, mesh)
  report["seconds"]["random"] = time.perf_counter() - start


def gaps(results) -> dict:
  """BYOL minus every other finite encoder, per metric."""
  out = {}
  byol = results.get("byol")
  for other in ("random", *PRETRAINED[1:]):
    if byol and other in results and byol["finite"] and results[other]["finite"]:
      for metric in ("knn_top1", "probe_top1"):
        out[f"byol_minus_{other}_{metric}"] = byol[metric] - results[other][metric]
  return out


def print_summary(report, settings):
  from byol_jax.evaluate import readout  # pylint: disable=g-import-not-at-top
  print("\n== CPU-budget learning quality "
        f"(ResNet-18 base_channels {settings['base_channels']}, {settings['image_size']} px, "
        f"{settings['steps']} steps x batch {settings['batch_size']})")
  print(readout.SUMMARY_HEADER)
  for name in ("byol", "random", "random_init_state", *PRETRAINED[1:]):
    if name in report["results"]:
      print(readout.summary_line(name, report["results"][name]))
  for key, value in report["gaps"].items():
    print(f"gap {key}: {100 * value:+.2f} points")
  print(f"linear probe: {report['linear_probe']}")
  print(f"wall time {report['seconds']['total']:.0f} s; load average at start "
        f"{report['load_average_start'][0]:.2f}, at end {report['load_average_end'][0]:.2f}")


def run(argv=None) -> dict:
  args, settings, variants = parse_args(argv)
  if not os.path.exists(args.data):
    raise SystemExit(f"{args.data} not found: pass --data or set BYOL_SHARED_DATA.")
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluate import readout  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel

  t0 = time.perf_counter()
  report = {
      "benchmark": "cpu_budget_quality", "budget": args.budget, "mode": args.mode,
      "settings": settings, "variants": variants, "data": os.path.abspath(args.data),
      "seed": args.seed,
      "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "",
                           *(argv if argv is not None else sys.argv[1:])]),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
      "load_average_start": list(os.getloadavg()),
      "linear_probe": ("softmax regression on frozen, standardised, un-augmented embeddings; "
                       f"full batch Adam, {settings['probe_steps']} steps, lr "
                       f"{settings['probe_lr']}; L2 weight from {list(readout.PROBE_WEIGHT_DECAYS)} "
                       "chosen on 10% of the probe's train features, then refitted"),
      "results": {}, "pretrain": {}, "seconds": {},
  }
  root = args.workdir or tempfile.mkdtemp(prefix="cpu_budget_")
  mesh = parallel.make_mesh()
  try:
    for variant in PRETRAINED:
      if variant not in variants:
        continue
      pretrain_variant(variant, settings, args, root, mesh, report)
    if "random" in variants:
      random_variants(settings, args, mesh, report)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)

  report["gaps"] = gaps(report["results"])
  report["seconds"]["total"] = time.perf_counter() - t0
  report["load_average_end"] = list(os.getloadavg())
  print_summary(report, settings)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  run()
