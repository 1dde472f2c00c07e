"""Read-out of frozen encoders: kNN, a linear probe and the collapse monitor.

Shared by the `compare` job (the demo's evidence) and
`benchmarks/cpu_budget_quality.py`. Features are the frozen `embedding`,
computed once per encoder on un-augmented (centre-cropped) images, and stay
sharded over the mesh (`features.extract`): the kNN is `knn.knn_accuracy`, the
probe trains data-parallel on each device's rows.

The linear probe is NOT the paper's protocol (100 epochs on augmented crops,
`--job=linear_eval`): it is softmax regression on standardised features, Adam,
a fixed number of steps, with its L2 weight picked on 10% of the probe's
training features and then refitted on all of them. Each step's batch is all
the training features when there are at most PROBE_BATCH of them (the demo:
full-batch, as it always was), else PROBE_BATCH drawn on the devices from
their own rows. Cheap enough to run on every encoder of a comparison.

The random-init baseline needs `recalibrate_bn`: at init Haiku's BN averages
hold the statistics of init's dummy batch (all-zero images, one uniform grey
after normalisation), not of real images, so inference-mode features of the
initial state are those of an arbitrarily rescaled network (identical or
non-finite in some settings, oddly strong in others). Re-estimating the
statistics with training-mode forwards over training images, weights
untouched, gives the random baseline under the same conditions as a
pretrained encoder's.
"""

import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from byol_jax.data import input_pipeline
from byol_jax.evaluate import evaluation, knn
from byol_jax.evaluate import features as features_lib
from byol_jax.model import networks
from byol_jax.train import optim, parallel, train_step

PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
PROBE_STEPS = 500
PROBE_LR = 0.01
PROBE_BATCH = 16384  # global examples per probe step beyond which it samples minibatches
_AXIS = parallel.DATA_AXIS


def features(config, nets, params, state, split: str, mesh, batch_size: int,
             sample: int = 0) -> features_lib.Features:
  """Frozen `embedding` and `projection` features (and labels) of one split, sharded."""
  embed = train_step.make_embed_fn(nets, mesh)
  batches = input_pipeline.eval_batches(config, split, batch_size=batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  return features_lib.extract(embed, params, state, batches, mesh,
                              keys=("embedding", "projection"), sample=sample)


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


def linear_probe(train: Dict, test: Dict, mesh, *, steps: int, lr: float, seed: int,
                 num_classes: int = 10, weight_decays=PROBE_WEIGHT_DECAYS,
                 batch_size: int = PROBE_BATCH) -> Dict:
  """Softmax regression on standardised frozen `embedding`s (sharded `Features`); the L2
  weight is chosen on a held-out 10% of the training rows, then refitted on all."""
  train_valid, test_valid = features_lib.valid(train), features_lib.valid(test)
  mean, std = _moments(train["embedding"], train_valid)
  x, test_x = _standardise(train["embedding"], mean, std), _standardise(test["embedding"],
                                                                          mean, std)
  held = _held_out(train, seed)
  fit = functools.partial(fit_probe, mesh=mesh, steps=steps, lr=lr, num_classes=num_classes,
                          local_batch=probe_local_batch(int(jnp.sum(train_valid)), batch_size,
                                                        mesh.devices.size), seed=seed)
  val = {wd: _accuracy(fit(x, train["label"], train_valid & ~held, wd), x, train["label"],
                       train_valid & held) for wd in weight_decays}
  best = max(weight_decays, key=lambda wd: (val[wd], -wd))
  params = fit(x, train["label"], train_valid, best)
  return {"top1": _accuracy(params, test_x, test["label"], test_valid),
          "train_top1": _accuracy(params, x, train["label"], train_valid),
          "weight_decay": best, "val_top1_by_weight_decay": {str(k): v for k, v in val.items()}}


def probe_local_batch(count: int, batch_size: int, devices: int) -> Optional[int]:
  """Rows each device draws per probe step: None (all its rows) up to `batch_size` rows."""
  return None if count <= batch_size else max(1, batch_size // devices)


@jax.jit
def _moments(x, valid):
  mean, std = evaluation.masked_moments(x, valid)
  return mean, std + 1e-6


@jax.jit
def _standardise(x, mean, std):
  return (x - mean) / std


def _held_out(train: Dict, seed: int):
  """The probe's held-out rows: 10% of the split's positions by a permutation seeded by
  `seed` (one byte per position on the host: the only split-sized host array)."""
  count = int(jnp.max(jnp.where(train["mask"], train["position"], -1))) + 1
  order = np.random.default_rng(seed).permutation(count)
  flags = np.zeros(count + 1, bool)  # the last entry: padding rows
  flags[order[:max(1, count // 10)]] = True
  return _lookup(jnp.asarray(flags), jnp.where(train["mask"], train["position"], count))


@jax.jit
def _lookup(flags, positions):
  return flags[positions]


@functools.partial(jax.jit, static_argnames=("mesh", "steps", "lr", "num_classes",
                                             "local_batch", "seed"))
def fit_probe(x, labels, rows, wd, *, mesh, steps, lr, num_classes, local_batch, seed):
  """Adam on mean cross-entropy over `rows` + wd x |W|^2, data-parallel over the devices'
  rows: all of them each step (`local_batch` None) or `local_batch` drawn per device."""
  optimizer = optax.adam(lr)

  def local(x, labels, rows):
    def loss_sums(p, xb, yb, wb):
      ce = optax.softmax_cross_entropy_with_integer_labels(xb @ p[0] + p[1], jnp.maximum(yb, 0))
      return jnp.sum(ce * wb)

    def body(step, carry):
      p, opt = carry
      xb, yb, wb = x, labels, rows.astype(jnp.float32)
      if local_batch is not None:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step),
                                 jax.lax.axis_index(_AXIS))
        pick = jax.random.randint(key, (local_batch,), 0, x.shape[0])
        xb, yb, wb = xb[pick], yb[pick], wb[pick]
      grads = jax.lax.psum(jax.grad(loss_sums)(p, xb, yb, wb), _AXIS)
      count = jnp.maximum(jax.lax.psum(jnp.sum(wb), _AXIS), 1.0)
      grads = (grads[0] / count + 2 * wd * p[0], grads[1] / count)
      updates, opt = optimizer.update(grads, opt, p)
      return optax.apply_updates(p, updates), opt

    params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
    return jax.lax.fori_loop(0, steps, body, (params, optimizer.init(params)))[0]

  return jax.shard_map(local, mesh=mesh, in_specs=(P(_AXIS), P(_AXIS), P(_AXIS)),
                       out_specs=P(), check_vma=False)(x, labels, rows)


def _accuracy(params, x, labels, rows) -> float:
  return evaluation.probe_accuracy(x @ params[0] + params[1], labels, rows)["top1"]


def score(train: Dict, test: Dict, mesh, *, num_classes: int, knn_k: int,
          knn_temperature: float, probe_steps: int, probe_lr: float, seed: int,
          knn_bank_dtype: str = "float32") -> Dict:
  """kNN top-1/5, linear-probe top-1 and spreads of one encoder's sharded train/test
  features."""
  result = {"num_train_features": train.count, "num_test_features": test.count}
  finite = all(bool(_finite(f[k], f["mask"])) for f in (train, test)
               for k in ("embedding", "projection"))
  result["finite"] = finite
  if not finite:  # top-k would count NaN scores as hits: report no accuracy at all
    return result
  accuracy = knn.knn_accuracy(train, test, mesh, num_classes=num_classes, k=knn_k,
                              temperature=knn_temperature, bank_dtype=knn_bank_dtype)
  probe = linear_probe(train, test, mesh, steps=probe_steps, lr=probe_lr, seed=seed,
                       num_classes=num_classes)
  result.update({
      "knn_top1": accuracy["top1"], "knn_top5": accuracy["top5"],
      "probe_top1": probe.pop("top1"), "probe": probe,
      "projection_spread": evaluation.projection_spread(test["projection"], test["mask"]),
      "embedding_spread": evaluation.projection_spread(test["embedding"], test["mask"]),
  })
  return result


@jax.jit
def _finite(x, mask):
  return jnp.all(jnp.where(mask[:, None], jnp.isfinite(x), True))


def read_out(config, nets, params, state, mesh, **kwargs) -> Dict:
  """`score` of one encoder, features extracted from `train_split` and `test_split`."""
  return read_out_features(config, nets, params, state, mesh, **kwargs)[0]


def read_out_features(config, nets, params, state, mesh, *, train_split: str, test_split: str,
                      batch_size: int, probe_steps: int = PROBE_STEPS,
                      probe_lr: float = PROBE_LR,
                      knn_k: Optional[int] = None, sample: int = 0):
  """`read_out`'s score and the sharded features it read: (score, train, test); `sample`
  rows of each also on the host (`features.extract`)."""
  train = features(config, nets, params, state, train_split, mesh, batch_size)
  test = features(config, nets, params, state, test_split, mesh, batch_size, sample=sample)
  result = score(train, test, mesh, num_classes=config.data.num_classes,
                 knn_k=knn_k or config.eval.knn_k, knn_temperature=config.eval.knn_temperature,
                 probe_steps=probe_steps, probe_lr=probe_lr, seed=config.seed,
                 knn_bank_dtype=config.eval.knn_bank_dtype)
  return result, train, test


def summary_line(name: str, r: Dict) -> str:
  """One line of a plain table: name, kNN top-1, probe top-1, projection spread."""
  if not r["finite"]:
    return f"{name:<24}{'non-finite features':>37}"
  return f"{name:<24}{r['knn_top1']:>10.4f}{r['probe_top1']:>13.4f}{r['projection_spread']:>14.3f}"


SUMMARY_HEADER = f"{'encoder':<24}{'kNN top-1':>10}{'probe top-1':>13}{'proj. spread':>14}"
