r"""CPU-budget learning quality: does BYOL learn anything in ~20 minutes on 2 CPU cores?

It pretrains a narrow ResNet-18 with BYOL on the real CIFAR-10 images of the
shared zip (`$BYOL_SHARED_DATA/cifar10/cifar10_jpeg.zip`, default
`<repo>/../shared/data`), through the library's own runner
(`main.run_job("pretrain", ...)` on the `resnet18_cifar10` recipe with
overrides), and compares the frozen features of

  byol          the BYOL encoder after the budget;
  random        the same architecture at its random initialisation (BYOL's own
                starting point, same seed), with the BN running statistics
                estimated on training images by training-mode forwards (no
                weight changes). The initial state's own running statistics
                cannot be used: Haiku's moving averages start at 0 with no
                update at init, so inference-mode BN divides by sqrt(0 + eps)
                at every layer and the features overflow to inf/NaN. The
                script checks that and reports it as `random_init_state`;
  no_predictor  the same recipe and budget with the predictor removed
                (`model.use_predictor=False`, the paper's ablation, which
                collapses).

Two read-outs on frozen `embedding` features, computed once per encoder with
`evaluation.extract` on centre-cropped images (no augmentation):

* kNN: `evaluation.knn_accuracy` (cosine, k=200, T=0.1, as in the recipe);
* linear probe: NOT the paper's protocol (which trains on augmented crops for
  100 epochs, `--job=linear_eval`). A benchmark-sized stand-in: multinomial
  logistic regression on standardised features, full batch, Adam, a fixed
  number of steps; its L2 weight is picked on a held-out 10% of the probe's
  training features, then it is refitted on all of them.

Train features come from `train[:N]` (a fixed, class-mixed pseudo-random subset
of the train split), test features from `test[:M]` (M=10000 is the whole test
split). It also prints the collapse monitor (`evaluation.projection_spread`:
~1 for spread-out projections, -> 0 under collapse) for each encoder and the
pretraining curves' last values, the gaps, the wall time of each phase and the
load average; with --json it writes all of it.

  python benchmarks/cpu_budget_quality.py --budget=full --json=cpu_budget.json
  python benchmarks/cpu_budget_quality.py --budget=tiny          # seconds-scale smoke run
  python benchmarks/cpu_budget_quality.py --budget=full --steps=200 --base_lr=2.0

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
VARIANTS = ("byol", "random", "no_predictor")

# Pretraining budget and read-out sizes. "full" is the ~20-minute run recorded in
# experiments/cpu_budget.md (chosen with the pilots listed there).
BUDGETS = {
    "tiny": dict(steps=2, batch_size=16, base_channels=4, image_size=16, mlp_hidden=32,
                 projection_dim=16, base_lr=1.0, base_tau=0.99, warmup_steps=1,
                 train_examples=128, test_examples=128, probe_steps=20, bn_batches=2,
                 eval_batch=64),
    "pilot": dict(steps=120, batch_size=128, base_channels=16, image_size=32, mlp_hidden=1024,
                  projection_dim=256, base_lr=0.5, base_tau=0.99, warmup_steps=12,
                  train_examples=5000, test_examples=2000, probe_steps=300, bn_batches=20,
                  eval_batch=500),
    "full": dict(steps=400, batch_size=128, base_channels=16, image_size=32, mlp_hidden=1024,
                 projection_dim=256, base_lr=0.5, base_tau=0.99, warmup_steps=40,
                 train_examples=10000, test_examples=10000, probe_steps=500, bn_batches=20,
                 eval_batch=500),
}
PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--budget", default="full", choices=sorted(BUDGETS))
  parser.add_argument("--data", default=DEFAULT_ZIP, help="CIFAR-10 zip (train/ and test/)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated subset of {','.join(VARIANTS)}")
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
  args = parser.parse_args(argv)
  settings = dict(BUDGETS[args.budget], probe_lr=0.01)
  for name in (*ints, "base_lr", "base_tau", "probe_lr"):
    if getattr(args, name) is not None:
      settings[name] = getattr(args, name)
  variants = [v for v in args.variants.split(",") if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
  if settings["test_examples"] > 10_000:
    parser.error("--test_examples is at most 10000 (the CIFAR-10 test split)")
  return args, settings, variants


def make_config(settings, data: str, seed: int, use_predictor: bool):
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
  c.model.use_predictor = use_predictor
  c.eval.every_steps = -1                    # read out below, once, on the final encoder
  c.checkpoint.every_steps = settings["steps"]
  c.checkpoint.keep = 1
  c.log_every_steps = max(1, settings["steps"] // 10)
  return c


def recalibrate_bn(nets, params, state, batches, mesh):
  """Re-estimates BN running statistics with training-mode forwards (weights untouched)."""
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax import parallel, train_step  # pylint: disable=g-import-not-at-top

  @jax.jit
  def step(state, images):
    images = train_step.normalize(train_step.to_float_images(images))
    return nets.online.apply(params, state, images, True)[1]

  for local in batches:
    state = step(state, parallel.to_global(local, mesh)["image"])
  return state


def linear_probe(train_x, train_y, test_x, test_y, *, steps: int, lr: float, seed: int,
                 num_classes: int = 10, weight_decays=PROBE_WEIGHT_DECAYS):
  """Softmax regression on standardised frozen features; L2 weight chosen on 10% held out."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  optimizer = optax.adam(lr)

  @jax.jit
  def fit(x, y, wd):
    params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))

    def loss(p):
      logits = x @ p[0] + p[1]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + wd * jnp.sum(p[0] ** 2)

    def body(_, carry):
      p, opt = carry
      updates, opt = optimizer.update(jax.grad(loss)(p), opt, p)
      return optax.apply_updates(p, updates), opt

    return jax.lax.fori_loop(0, steps, body, (params, optimizer.init(params)))[0]

  def accuracy(p, x, y):
    return float(np.mean(np.argmax(np.asarray(x @ p[0] + p[1]), -1) == y))

  order = np.random.default_rng(seed).permutation(len(train_x))
  held = order[:max(1, len(order) // 10)]
  kept = order[len(held):]
  val = {wd: accuracy(fit(train_x[kept], train_y[kept], wd), train_x[held], train_y[held])
         for wd in weight_decays}
  best = max(weight_decays, key=lambda wd: (val[wd], -wd))
  params = fit(train_x, train_y, best)
  return {"top1": accuracy(params, test_x, test_y),
          "train_top1": accuracy(params, train_x, train_y),
          "weight_decay": best, "val_top1_by_weight_decay": {str(k): v for k, v in val.items()}}


def read_out(name, nets, params, state, config, settings, mesh):
  """kNN, linear probe and collapse monitor of one encoder's frozen features."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax import evaluation, input_pipeline, train_step  # pylint: disable=g-import-not-at-top
  embed = train_step.make_embed_fn(nets, mesh)
  feats = {}
  for part, split in (("train", f"train[:{settings['train_examples']}]"),
                      ("test", f"test[:{settings['test_examples']}]")):
    batches = input_pipeline.eval_batches(config, split, batch_size=settings["eval_batch"],
                                          process_index=0, process_count=1)
    feats[part] = evaluation.extract(embed, params, state, batches, mesh,
                                     keys=("embedding", "projection"))
  train, test = feats["train"], feats["test"]
  finite = all(np.isfinite(f[k]).all() for f in (train, test) for k in ("embedding", "projection"))
  if not finite:  # kNN / top-k would count NaN scores as hits: report no accuracy at all
    print(f"[{name}] non-finite features: no accuracy reported", flush=True)
    return {"finite": False, "num_train_features": int(len(train["label"])),
            "num_test_features": int(len(test["label"]))}
  knn = evaluation.knn_accuracy(train["embedding"], train["label"], test["embedding"],
                                test["label"], num_classes=config.data.num_classes,
                                k=config.eval.knn_k, temperature=config.eval.knn_temperature)
  probe = linear_probe(train["embedding"], train["label"], test["embedding"], test["label"],
                       steps=settings["probe_steps"], lr=settings["probe_lr"],
                       seed=config.seed, num_classes=config.data.num_classes)
  result = {
      "finite": True, "knn_top1": knn["top1"], "knn_top5": knn["top5"],
      "probe_top1": probe.pop("top1"), "probe": probe,
      "projection_spread": evaluation.projection_spread(test["projection"]),
      "embedding_spread": evaluation.projection_spread(test["embedding"]),
      "num_train_features": int(len(train["label"])), "num_test_features": int(len(test["label"])),
  }
  print(f"[{name}] kNN top-1 {result['knn_top1']:.4f} | linear probe top-1 "
        f"{result['probe_top1']:.4f} (wd {probe['weight_decay']:g}) | projection_spread "
        f"{result['projection_spread']:.3f} | embedding_spread {result['embedding_spread']:.3f}",
        flush=True)
  return result


def run(argv=None) -> dict:
  args, settings, variants = parse_args(argv)
  if not os.path.exists(args.data):
    raise SystemExit(f"{args.data} not found: pass --data or set BYOL_SHARED_DATA.")
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax import input_pipeline, main, networks, parallel, pretrain, train_step  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  report = {
      "benchmark": "cpu_budget_quality", "budget": args.budget, "settings": settings,
      "variants": variants, "data": os.path.abspath(args.data), "seed": args.seed,
      "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "",
                           *(argv if argv is not None else sys.argv[1:])]),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
      "load_average_start": list(os.getloadavg()),
      "linear_probe": ("softmax regression on frozen, standardised, un-augmented embeddings; "
                       f"full batch Adam, {settings['probe_steps']} steps, lr "
                       f"{settings['probe_lr']}; L2 weight from {list(PROBE_WEIGHT_DECAYS)} "
                       "chosen on 10% of the probe's train features, then refitted"),
      "results": {}, "pretrain": {}, "seconds": {},
  }
  root = args.workdir or tempfile.mkdtemp(prefix="cpu_budget_")
  mesh = parallel.make_mesh()
  results = report["results"]
  try:
    for variant in ("byol", "no_predictor"):
      if variant not in variants:
        continue
      config = make_config(settings, args.data, args.seed, use_predictor=variant == "byol")
      workdir = os.path.join(root, variant)
      start = time.perf_counter()
      last = main.run_job("pretrain", config, workdir)
      report["seconds"][f"pretrain_{variant}"] = time.perf_counter() - start
      report["pretrain"][variant] = {k: last[k] for k in (
          "byol_loss", "projection_std", "probe_top1", "images_per_s") if k in last}
      start = time.perf_counter()
      final_config, nets, state = pretrain.load_pretrained(config, workdir, mesh)
      results[variant] = read_out(variant, nets, state.online_params, state.online_state,
                                  final_config, settings, mesh)
      report["seconds"][f"readout_{variant}"] = time.perf_counter() - start

    if "random" in variants:
      start = time.perf_counter()
      config = pretrain.prepare(make_config(settings, args.data, args.seed, True), mesh)
      nets = networks.make_networks(config.model, config.data.num_classes)
      state = pretrain.create_state(config, nets, train_step.make_optimizer(config), mesh)
      results["random_init_state"] = read_out(
          "random_init_state", nets, state.online_params, state.online_state, config, settings,
          mesh)
      batches = input_pipeline.eval_batches(
          config, f"train[:{settings['bn_batches'] * settings['eval_batch']}]",
          batch_size=settings["eval_batch"], process_index=0, process_count=1)
      calibrated = recalibrate_bn(nets, state.online_params, state.online_state, batches, mesh)
      results["random"] = read_out("random", nets, state.online_params, calibrated, config,
                                   settings, mesh)
      report["seconds"]["random"] = time.perf_counter() - start
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)

  gaps = {}
  for other in ("random", "no_predictor"):
    if "byol" in results and other in results:
      for metric in ("knn_top1", "probe_top1"):
        if results["byol"]["finite"] and results[other]["finite"]:
          gaps[f"byol_minus_{other}_{metric}"] = results["byol"][metric] - results[other][metric]
  report["gaps"] = gaps
  report["seconds"]["total"] = time.perf_counter() - t0
  report["load_average_end"] = list(os.getloadavg())

  print("\n== CPU-budget learning quality "
        f"(ResNet-18 base_channels {settings['base_channels']}, {settings['image_size']} px, "
        f"{settings['steps']} steps x batch {settings['batch_size']})")
  print(f"{'encoder':<24}{'kNN top-1':>10}{'probe top-1':>13}{'proj. spread':>14}")
  for name in ("byol", "random", "random_init_state", "no_predictor"):
    r = results.get(name)
    if r and not r["finite"]:
      print(f"{name:<24}{'non-finite features':>37}")
    elif r:
      print(f"{name:<24}{r['knn_top1']:>10.4f}{r['probe_top1']:>13.4f}"
            f"{r['projection_spread']:>14.3f}")
  for key, value in gaps.items():
    print(f"gap {key}: {100 * value:+.2f} points")
  print(f"linear probe: {report['linear_probe']}")
  print(f"wall time {report['seconds']['total']:.0f} s; load average at start "
        f"{report['load_average_start'][0]:.2f}, at end {report['load_average_end'][0]:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  run()
