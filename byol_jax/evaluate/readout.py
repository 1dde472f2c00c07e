"""Read-out of frozen encoders: kNN, a linear probe and the collapse monitor.

Shared by the `compare` job (the demo's evidence) and
`benchmarks/cpu_budget_quality.py`. Features are the frozen `embedding`,
computed once per encoder on un-augmented (centre-cropped) images.

The linear probe is NOT the paper's protocol (100 epochs on augmented crops,
`--job=linear_eval`): it is softmax regression on standardised features, full
batch, Adam, a fixed number of steps, with its L2 weight picked on 10% of the
probe's training features and then refitted on all of them. Cheap enough to
run on every encoder of a comparison.

The random-init baseline needs `recalibrate_bn`: at init Haiku's BN averages
hold the statistics of init's dummy batch (all-zero images, one uniform grey
after normalisation), not of real images, so inference-mode features of the
initial state are those of an arbitrarily rescaled network (identical or
non-finite in some settings, oddly strong in others). Re-estimating the
statistics with training-mode forwards over training images, weights
untouched, gives the random baseline under the same conditions as a
pretrained encoder's.
"""

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from byol_jax.data import input_pipeline
from byol_jax.evaluate import evaluation
from byol_jax.model import networks
from byol_jax.train import optim, parallel, train_step

PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def features(config, nets, params, state, split: str, mesh, batch_size: int) -> Dict:
  """Frozen `embedding` and `projection` features (and labels) of one split."""
  embed = train_step.make_embed_fn(nets, mesh)
  batches = input_pipeline.eval_batches(config, split, batch_size=batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  return evaluation.extract(embed, params, state, batches, mesh,
                            keys=("embedding", "projection"))


def initial_network(config, mesh):
  """BYOL's starting point for this config and seed: (config, nets, params, state).

  `config` is finalised (`config_lib.prepare`). The state's BN averages are the
  statistics of init's dummy batch: see `recalibrate_bn`.
  """
  nets = networks.make_networks(config.model, config.data.num_classes)
  state = train_step.create_state(config, nets, optim.make_optimizer(config), mesh)
  return config, nets, state.online_params, state.online_state


def random_baseline(config, mesh, *, bn_split: str, batch_size: int):
  """`initial_network` with BN statistics estimated on `bn_split`: (config, nets, params, state)."""
  config, nets, params, state = initial_network(config, mesh)
  batches = input_pipeline.eval_batches(config, bn_split, batch_size=batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  return config, nets, params, recalibrate_bn(nets, params, state, batches, mesh)


def recalibrate_bn(nets, params, state, batches, mesh):
  """Re-estimates BN running statistics with training-mode forwards (weights untouched)."""

  @jax.jit
  def step(state, images):
    return nets.online.apply(params, state, images, True)[1]

  for local in batches:
    state = step(state, parallel.to_global(local, mesh)["image"])
  return state


def linear_probe(train_x, train_y, test_x, test_y, *, steps: int, lr: float, seed: int,
                 num_classes: int = 10, weight_decays=PROBE_WEIGHT_DECAYS) -> Dict:
  """Softmax regression on standardised frozen features; L2 weight chosen on 10% held out."""
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


def score(train: Dict, test: Dict, *, num_classes: int, knn_k: int, knn_temperature: float,
          probe_steps: int, probe_lr: float, seed: int) -> Dict:
  """kNN top-1/5, linear-probe top-1 and spreads of one encoder's train/test features."""
  result = {"num_train_features": int(len(train["label"])),
            "num_test_features": int(len(test["label"]))}
  finite = all(np.isfinite(f[k]).all() for f in (train, test) for k in ("embedding", "projection"))
  result["finite"] = bool(finite)
  if not finite:  # top-k would count NaN scores as hits: report no accuracy at all
    return result
  knn = evaluation.knn_accuracy(train["embedding"], train["label"], test["embedding"],
                                test["label"], num_classes=num_classes, k=knn_k,
                                temperature=knn_temperature)
  probe = linear_probe(train["embedding"], train["label"], test["embedding"], test["label"],
                       steps=probe_steps, lr=probe_lr, seed=seed, num_classes=num_classes)
  result.update({
      "knn_top1": knn["top1"], "knn_top5": knn["top5"],
      "probe_top1": probe.pop("top1"), "probe": probe,
      "projection_spread": evaluation.projection_spread(test["projection"]),
      "embedding_spread": evaluation.projection_spread(test["embedding"]),
  })
  return result


def read_out(config, nets, params, state, mesh, **kwargs) -> Dict:
  """`score` of one encoder, features extracted from `train_split` and `test_split`."""
  return read_out_features(config, nets, params, state, mesh, **kwargs)[0]


def read_out_features(config, nets, params, state, mesh, *, train_split: str, test_split: str,
                      batch_size: int, probe_steps: int = 500, probe_lr: float = 0.01,
                      knn_k: Optional[int] = None):
  """`read_out`'s score and the features it read: (score, train, test)."""
  train = features(config, nets, params, state, train_split, mesh, batch_size)
  test = features(config, nets, params, state, test_split, mesh, batch_size)
  result = score(train, test, num_classes=config.data.num_classes,
                 knn_k=knn_k or config.eval.knn_k, knn_temperature=config.eval.knn_temperature,
                 probe_steps=probe_steps, probe_lr=probe_lr, seed=config.seed)
  return result, train, test


def summary_line(name: str, r: Dict) -> str:
  """One line of a plain table: name, kNN top-1, probe top-1, projection spread."""
  if not r["finite"]:
    return f"{name:<24}{'non-finite features':>37}"
  return f"{name:<24}{r['knn_top1']:>10.4f}{r['probe_top1']:>13.4f}{r['projection_spread']:>14.3f}"


SUMMARY_HEADER = f"{'encoder':<24}{'kNN top-1':>10}{'probe top-1':>13}{'proj. spread':>14}"
