r"""Whole-step parity with DeepMind's reference BYOL: same state, same views, K updates.

The reference (deepmind-research/byol) is read from the checkout --reference_dir
names (`reference_import.py`); none of its code is in byol_jax. The script

1. builds the reference's `ByolExperiment` from its own `configs/byol.py`
   (--num_epochs picks its lr / weight-decay / EMA presets; max_steps and the
   warm-up follow from --batch_size as in a real run) and takes its initial
   state (`_make_initial_state`, its seed);
2. maps that state into byol_jax's `TrainState` with the mapping that
   `--job=import_reference` uses (`reference_checkpoint.to_train_state`: online
   and target parameters, BatchNorm statistics, LARS momentum, step), and gives
   byol_jax's config the reference's max_steps, warm-up, base lr, weight decay,
   eta, momentum, tau, batch, heads and classes (`byol_jax_config`);
3. feeds both updates the same views (uniform noise in [0, 1], float32, a new
   batch each step) and the same global_step sequence, from --start_step
   (default: two steps before the end of the warm-up, so that the updates cross
   into the cosine decay). Augmentation is off on both sides: the reference's
   loss calls `augmentations.postprocess(inputs, rng)` through its module, which
   this process replaces by the identity (the same arrays and dtype), and
   byol_jax's step gets the identity as its `augment` function;
4. after each update prints both BYOL and probe losses, lr and tau, and per
   group (online parameters, target parameters, BatchNorm statistics of both
   networks, LARS momentum) the worst relative difference and its tensor. A
   tensor's relative difference is max |ours - reference| / max |reference|
   (integer counters must be equal), both states read in byol_jax's layout.
   Beside it, the reference's own spread: the reference again from the same
   state, every pixel of its views one float32 ulp up, against itself;
5. does this on 1 device and with the batch split over N (--devices=1,8), each
   in a process of its own that sees exactly that many simulated CPU devices
   (the reference's linear evaluation divides by jax.device_count()): the
   reference under `jax.pmap` (its BatchNorm reduces statistics over the
   devices), byol_jax under its mesh shardings;
6. runs the linear-evaluation update likewise: the reference's
   `eval_experiment.py` (its `configs/eval.py`: frozen backbone, SGD with
   Nesterov momentum, no weight decay, cosine lr) against `--job=linear_eval`'s
   (`train/linear_step.make_linear_step`), on the online encoder the reference's
   pretraining updates left (mapped for byol_jax), from the reference's
   classifier init, with the same batches and steps from 0.

Not compared: the reference's target network also carries a predictor and a
classifier, which its loss never reads (byol_jax's target has neither); and the
biases of the heads' first Linear, which feed a BatchNorm, so that the loss does
not depend on them and they hold float rounding only: their sizes are printed.

Targets. In float32 (the default) every loss, lr and tau to 1e-5 relative at
every step, and every tensor to 1e-4 relative after the K updates, or else the
tensors' differences spread no wider than the reference's own one-ulp spread:
their median, 90th percentile and largest each at most SPREAD_FACTOR times the
reference's against itself (a randomly initialised ResNet-50 at batch 16
amplifies float32 rounding to ~1e-1 in 5 updates, whatever computes it). In
float64 (--dtype=float64: jax_enable_x64 in both codes, byol_jax's
compute_dtype="float64") rounding cannot hide a difference in the algorithm:
every loss, lr and tau to 1e-12 and every tensor to 1e-8, no spread run. The
reference hard-codes float32 in one place its step reads, the warm-up's
`global_step.astype(jnp.float32)` (utils/schedules.py); in float64 each of its
modules sees a `jnp` whose float32 is float64 (`_float64_reference`), a dtype
constant and none of its maths, and the script stops if any float of its state
or compared logs is still float32. The last line says PASS or FAIL (exit status 1); the
JSON (--json) holds every figure.

  python benchmarks/reference_parity.py --reference_dir=PATH [--dtype=float64]
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import types
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_import  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from byol_jax.configs import base  # noqa: E402
from byol_jax.interop import reference_checkpoint  # noqa: E402
from byol_jax.model import networks, resnet  # noqa: E402
from byol_jax.train import linear_step, optim, parallel, train_step  # noqa: E402

# dtype -> (loss, lr and tau at every step; every tensor after the K updates), relative
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-12, 1e-8)}
SPREAD_FACTOR = 2.0  # float32: ours may spread this much wider than the reference's own
REFERENCE_MODULES = ("byol_experiment", "eval_experiment", "configs.byol", "configs.eval",
                     "utils.augmentations")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference_dir", required=True,
                      help="a deepmind-research checkout: the folder that holds byol/")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16, help="global batch")
  parser.add_argument("--steps", type=int, default=5, help="updates K of each run")
  parser.add_argument("--devices", default="1,8", help="device counts, one run each")
  parser.add_argument("--num_epochs", type=int, default=300,
                      help="picks the reference's lr / weight decay / EMA presets")
  parser.add_argument("--start_step", type=int, default=None,
                      help="global_step of the first update (default: warm-up steps - 2)")
  parser.add_argument("--dtype", default="float32", choices=tuple(TOLERANCES),
                      help="float64: both codes under jax_enable_x64, held to 1e-12 / 1e-8")
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  parser.add_argument("--one_run", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.devices = [int(d) for d in args.devices.split(",")]
  for n in args.devices:
    if n < 1 or args.batch_size % n:
      raise SystemExit(f"--batch_size={args.batch_size} does not split over {n} devices: "
                       "pick --devices that divide it.")
  return args


# --------------------------------------------------------------------------- #
# byol_jax's config from the reference's
# --------------------------------------------------------------------------- #


def byol_jax_config(ref: dict, image_size: int, stem_channels: int):
  """byol_jax's base config with the reference's schedule, optimizer, EMA, batch and network."""
  bn = ref["network_config"]["bn_config"]
  if (bn["decay_rate"], bn["eps"]) != (resnet.BN_DECAY, resnet.BN_EPS):
    raise SystemExit(f"The reference's bn_config {bn} is not byol_jax's BatchNorm (decay "
                     f"{resnet.BN_DECAY}, eps {resnet.BN_EPS}).")
  c = base.get_base_config()
  c.batch_size = ref["batch_size"]
  c.steps = ref["max_steps"]
  c.warmup_steps = ref["lr_schedule_config"]["warmup_steps"]
  c.base_tau = ref["base_target_ema"]
  c.optimizer.update(base_lr=ref["lr_schedule_config"]["base_learning_rate"],
                     **ref["optimizer_config"])
  net = ref["network_config"]
  width = net["encoder_config"]["width_multiplier"]
  c.model.update(dict(
      depth=int(net["encoder_class"][len("ResNet"):]), width=width,
      base_channels=stem_channels // width, padding="haiku_same",
      projector_hidden=net["projector_hidden_size"], predictor_hidden=net["predictor_hidden_size"],
      projection_dim=net["projector_output_size"], head_bias=False, head_norm=True))
  c.data.image_size = image_size
  c.data.num_classes = ref["num_classes"]
  return c


# --------------------------------------------------------------------------- #
# Comparison
# --------------------------------------------------------------------------- #


def _flat(tree, prefix="") -> dict:
  return {f"{prefix}{m}/{n}": np.asarray(v) for m, leaves in tree.items()
          for n, v in leaves.items()}


# The biases of the heads' first Linear feed a BatchNorm, which subtracts them again: the loss
# does not depend on them, so their gradient, and with it their value (both start at 0), is 0
# but for float rounding in both codes. They are not compared relatively; their sizes are shown.
_INVARIANT = re.compile(r"(projector|predictor)/linear1/b")


def relative_difference(ours, ref) -> float:
  """max |ours - ref| / max |ref|; integer tensors must be equal (0 or inf)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  if ours.shape != ref.shape:
    return float("inf")
  if not np.issubdtype(ref.dtype, np.floating):
    return 0.0 if np.array_equal(ours, ref) else float("inf")
  diff = float(np.max(np.abs(ours.astype(np.float64) - ref)))
  scale = float(np.max(np.abs(ref)))
  return 0.0 if diff == 0 else diff / scale if scale > 0 else float("inf")


def compare(groups_ours: dict, groups_ref: dict) -> dict:
  """{group: {tensor: relative difference}}, and under "loss-invariant" {tensor: (max |ours|,
  max |ref|)} for the biases feeding BatchNorm."""
  out = {"loss-invariant": {}}
  for group, ref in groups_ref.items():
    ours = groups_ours[group]
    if set(ours) != set(ref):
      raise SystemExit(f"{group}: byol_jax has {sorted(set(ours) ^ set(ref))[:3]} where the "
                       "reference has not (or the reverse): the mapping is incomplete.")
    out[group] = {k: relative_difference(ours[k], ref[k]) for k in ref
                  if not _INVARIANT.fullmatch(k)}
    out["loss-invariant"].update({f"{group} {k}": (float(np.max(np.abs(ours[k]))),
                                                   float(np.max(np.abs(ref[k]))))
                                  for k in ref if _INVARIANT.fullmatch(k)})
  if not out["loss-invariant"]:
    del out["loss-invariant"]
  return out


def worst(comparison: dict) -> dict:
  """{group: (worst relative difference, its tensor)}."""
  return {g: max((rel, k) for k, rel in tensors.items())
          for g, tensors in comparison.items() if g != "loss-invariant"}


def pretrain_groups(state: train_step.TrainState) -> dict:
  return {"online params": _flat(state.online_params),
          "target params": _flat(state.target_params),
          "BN statistics": {**_flat(state.online_state, "online "),
                            **_flat(state.target_state, "target ")},
          "LARS momentum": _flat(optim.lars_momentum(state.opt_state))}


def _loss_line(name, ours, ref):
  rel = abs(ours - ref) / max(abs(ref), 1e-30)
  return rel, f"{name} {ours:.7g} / {ref:.7g} (rel {rel:.1e})"


def _tensor_line(comparison: dict) -> str:
  line = "; ".join(f"{g} {rel:.1e} ({name})" for g, (rel, name) in worst(comparison).items())
  sizes = comparison.get("loss-invariant")
  if sizes:
    biggest = max(sizes.values(), key=max)
    line += (f"; biases feeding BatchNorm (0 but for rounding) up to {biggest[0]:.0e} / "
             f"{biggest[1]:.0e}")
  return line


def _records(comparison: dict) -> dict:
  return {"worst": {g: {"relative": r, "tensor": t} for g, (r, t) in worst(comparison).items()},
          "loss_invariant_max_abs": comparison.get("loss-invariant", {})}


def _quantiles(relative: dict) -> list:
  """Median, 90th percentile and largest of the tensors' relative differences."""
  values = np.asarray(list(relative.values()))
  return [float(np.median(values)), float(np.percentile(values, 90)), float(values.max())]


def over_target(ours: dict, tolerance: float, itself: Optional[dict] = None):
  """(summary, {tensor: [ours, itself]}, {"ours": quantiles, "reference": quantiles}) after
  the last update: the tensors above `tolerance` and how the differences spread (`_quantiles`),
  beside the reference's own spread (its views one ulp up) if given."""
  flat = lambda c: {f"{g} {k}": r for g, t in c.items() if g != "loss-invariant"
                    for k, r in t.items()}
  ours, itself = flat(ours), flat(itself) if itself else None
  over = {k: [r, itself[k] if itself else None] for k, r in ours.items() if r > tolerance}
  spread = lambda rel: "median {:.0e}, 90th percentile {:.0e}, largest {:.1e}".format(
      *_quantiles(rel))
  text = f"{len(over)} of {len(ours)} tensors above {tolerance:g} ({spread(ours)})"
  quantiles = {"ours": _quantiles(ours)}
  if itself:
    text += (f"; the reference against itself, its views one ulp up: "
             f"{sum(r > tolerance for r in itself.values())} ({spread(itself)})")
    quantiles["reference"] = _quantiles(itself)
  return text, over, quantiles


# --------------------------------------------------------------------------- #
# Runs
# --------------------------------------------------------------------------- #


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _first(tree):
  """Device 0's copy of a pmapped output, on the host."""
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def _replicate(tree, n):
  return jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), tree)


def _split(batch, n):
  return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def make_batches(args, num_classes):
  """The same views in either dtype (float32 draws, held in --dtype)."""
  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  return [dict(view1=rng.random(shape, np.float32).astype(args.dtype),
               view2=rng.random(shape, np.float32).astype(args.dtype),
               labels=rng.integers(0, num_classes, args.batch_size).astype(np.int32))
          for _ in range(args.steps)]


def _one_ulp_up(batch):
  return dict(batch, view1=np.nextafter(batch["view1"], np.float32(2)),
              view2=np.nextafter(batch["view2"], np.float32(2)))


def _float64_reference(modules) -> None:
  """Gives each loaded module of the reference (byol.*) a `jnp` whose float32 is float64.

  Its step reads one hard-coded float32, the warm-up learning rate's
  `global_step.astype(jnp.float32)` (utils/schedules.py); its augmentations (bypassed here)
  have others. Only that dtype name changes, none of its maths."""
  float64_jnp = types.ModuleType("jax.numpy (float32 -> float64)")
  float64_jnp.__getattr__ = lambda name: getattr(jnp, name)
  float64_jnp.float32 = jnp.float64
  for name, module in list(sys.modules.items()):
    if (name == "byol" or name.startswith("byol.")) and getattr(module, "jnp", None) is jnp:
      module.jnp = float64_jnp
      modules.append(name)


def check_float64(tree, what: str) -> None:
  """Stops if any float of the reference's `tree` is not float64."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = np.asarray(leaf).dtype
    if np.issubdtype(dtype, np.floating) and dtype != np.float64:
      raise SystemExit(f"The reference's {what}{jax.tree_util.keystr(path)} is {dtype} in a "
                       "float64 run: it hard-codes a dtype that _float64_reference misses.")


def reference_update(experiment):
  """The reference's `_update_fn` under `jax.pmap(axis_name="i")`, as its `update_pmap`, but
  with the old state's buffers donated: 8 replicas of ResNet-50's state twice over would not
  fit a small machine."""
  update = experiment._update_fn  # pylint: disable=protected-access
  return jax.pmap(update, axis_name="i", donate_argnums=0)


def reference_pretrain(update, ref_state0, steps, batches, n, to_ours, float64=False):
  """Yields, for each of the reference's K updates on n devices, its logs, its state in
  byol_jax's layout as `pretrain_groups` (host arrays) and its online network as it is.
  `float64`: stops if any float of its state or of the logs compared is not float64 (its
  top-k accuracies, means of booleans, are float32 and not compared)."""
  state = jax.pmap(lambda x: x)(_replicate(ref_state0, n))  # on the devices, to be donated
  keys = np.zeros((n, 2), np.uint32)  # read only by the bypassed augmentation
  for step, batch in zip(steps, batches):
    state, logs = update(state, np.full((n,), step, np.int32), keys, _split(batch, n))
    host = _first(state)
    if float64:
      compared = {ref: _first(logs)[ref] for _, _, ref in _LOGS}
      check_float64((host, compared), f"(state, logs) after global_step {step}")
    yield _first(logs), pretrain_groups(to_ours(host, step + 1)), (host.online_params,
                                                                    host.online_state)


class _Stored:
  """`pretrain_groups` of each step in .npz files in a temporary folder, read back one at a time."""

  def __init__(self):
    self.folder = tempfile.TemporaryDirectory(prefix="reference_parity_")
    self.count = 0

  def add(self, groups: dict) -> None:
    names = [(g, k) for g, tensors in groups.items() for k in tensors]
    np.savez(os.path.join(self.folder.name, f"{self.count}.npz"),
             names=np.asarray([f"{g}\t{k}" for g, k in names]),
             **{f"t{i}": groups[g][k] for i, (g, k) in enumerate(names)})
    self.count += 1

  def __getitem__(self, index: int) -> dict:
    with np.load(os.path.join(self.folder.name, f"{index}.npz"), allow_pickle=False) as f:
      groups = {}
      for i, name in enumerate(f["names"]):
        group, tensor = str(name).split("\t")
        groups.setdefault(group, {})[tensor] = f[f"t{i}"]
      return groups


# (printed name, byol_jax's metric, the reference's log)
_LOGS = (("BYOL loss", "byol_loss", "repr_loss"), ("probe loss", "probe_loss", "classif_loss"),
         ("lr", "learning_rate", "learning_rate"), ("tau", "tau", "tau"))


def _as_reference_logs(metrics) -> dict:
  return {ref: metrics[ours] for _, ours, ref in _LOGS}


def _losses(logs, ref_logs) -> dict:
  """{name: (relative difference, printed line)} of the losses, lr and tau; both in the
  reference's names."""
  return {name: _loss_line(name, float(logs[ref]), float(ref_logs[ref]))
          for name, _, ref in _LOGS}


def pretrain_parity(experiment, ref_state0, config, steps, batches, n):
  """K updates of both on n devices; per-step records and the reference's last online
  (params, state).

  In float32, beside byol_jax's differences it records the reference's own spread: the
  reference again, every pixel of its views one float32 ulp up, against itself.
  """
  float64 = config.compute_dtype == "float64"
  mesh = parallel.make_mesh(jax.devices()[:n])
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = optim.make_optimizer(config)
  to_ours = lambda ref, step: reference_checkpoint.to_train_state(
      ref, step, config.model, optimizer, rng=np.zeros(2, np.uint32),
      dtype=networks.param_dtype(config.compute_dtype))
  reference, ref_logs, ref_update = _Stored(), [], reference_update(experiment)
  for logs, groups, last in reference_pretrain(ref_update, ref_state0, steps, batches, n,
                                               to_ours, float64):
    reference.add(groups)
    ref_logs.append(logs)
  floors = [None] * len(steps)
  if not float64:
    nudged = reference_pretrain(ref_update, ref_state0, steps, map(_one_ulp_up, batches), n,
                                to_ours)
    floors = [(_losses(logs, ref_logs[i]), compare(groups, reference[i]))
              for i, (logs, groups, _) in enumerate(nudged)]
  state = jax.device_put(to_ours(ref_state0, steps[0]), parallel.replicated(mesh))
  update = train_step.make_update_fn(config, nets, optimizer, mesh,
                                     augment=lambda images, key, view: images)
  records, name = [], f"[pretrain, {n} device(s)]"
  for i, (step, batch, floor) in enumerate(zip(steps, batches, floors)):
    ours_batch = dict(view1=batch["view1"], view2=batch["view2"], label=batch["labels"])
    state, logs = update(state, jax.device_put(ours_batch, parallel.batch_sharded(mesh)))
    ours = parallel.fetch(state)
    counters = (int(ours.step), int(optax.tree_utils.tree_get(ours.opt_state, "count")))
    if counters != (step + 1, step + 1):
      raise SystemExit(f"byol_jax's step counters after global_step {step} are {counters}, "
                       f"not {step + 1}.")
    losses = _losses(_as_reference_logs(_host(logs)), ref_logs[i])
    tensors = compare(pretrain_groups(ours), reference[i])
    print(f"{name} global_step {step}: " + ", ".join(line for _, line in losses.values())
          + f"\n    worst tensors: {_tensor_line(tensors)}", flush=True)
    records.append(dict(global_step=step, losses={k: v[0] for k, v in losses.items()},
                        tensors=_records(tensors)))
    if floor:
      print("    the reference against itself, its views one ulp up: "
            + ", ".join(f"{loss} {rel:.1e}" for loss, (rel, _) in floor[0].items())
            + f"; {_tensor_line(floor[1])}", flush=True)
      records[-1]["reference_one_ulp"] = dict(losses={k: v[0] for k, v in floor[0].items()},
                                              tensors=_records(floor[1]))
  (records[-1]["summary"], records[-1]["over_target"],
   records[-1]["spread"]) = over_target(tensors, TOLERANCES[config.compute_dtype][1],
                                        floor[1] if floor else None)
  return records, last


def linear_eval_parity(experiment, ref_cfg, model_config, encoder, batches, n, dtype):
  """K linear-evaluation updates of both on n devices from the reference's classifier init."""
  params, state = encoder
  dummy = _split(dict(images=batches[0]["view1"], labels=batches[0]["labels"]), 1)
  init = jax.pmap(experiment._make_initial_state, axis_name="i")  # pylint: disable=protected-access
  ref_state = _first(init(np.zeros((1, 2), np.uint32), dummy, *_replicate((params, state), 1)))
  ref_state = ref_state._replace(backbone_opt_state=None)  # frozen, as its _initialize_train
  if ref_cfg["lr_schedule_config"]["warmup_steps"] or "weight_decay" in ref_cfg["optimizer_config"]:
    raise SystemExit("The reference's linear evaluation has a warm-up or weight decay, which "
                     "--job=linear_eval's step has not: compare against another config.")
  config = base.get_base_config()
  config.model = model_config
  config.data.num_classes = ref_cfg["num_classes"]
  config.data.image_size = batches[0]["view1"].shape[1]
  config.linear_eval.update(dict(batch_size=ref_cfg["batch_size"], **ref_cfg["optimizer_config"]))
  mesh = parallel.make_mesh(jax.devices()[:n])
  linear = linear_step.make_linear_step(
      config, mesh, lr=ref_cfg["lr_schedule_config"]["base_learning_rate"], weight_decay=0.0,
      steps=ref_cfg["max_steps"], compute_dtype=dtype)
  (ref_head,) = ref_state.classif_params.values()  # Haiku's default name: "linear"
  head = {"classifier": dict(ref_head)}
  enc_params, enc_state, _ = reference_checkpoint.to_byol_jax(params, state, model_config,
                                                              dtype)
  # The head's SGD momentum starts at zero whatever the head's values: take the reference's.
  ours = linear.init(enc_params, enc_state)._replace(head_params=head)
  ours = jax.device_put(ours, parallel.replicated(mesh))
  ref_state = _replicate(ref_state, n)

  def groups(head, trace, bn_state):
    return {"classifier": _flat(head), "momentum": _flat(trace),
            "encoder BN statistics": _flat(networks.encoder_subset(bn_state))}

  records = []
  for step, batch in enumerate(batches):
    inputs = dict(images=batch["view1"], labels=batch["labels"])
    ref_state, ref_logs = experiment.update_pmap(ref_state, np.full((n,), step, np.int32),
                                                 _split(inputs, n))
    ours, logs = linear.update(ours, jax.device_put(
        dict(image=inputs["images"], label=inputs["labels"]), parallel.batch_sharded(mesh)))
    ref, mine = _first(ref_state), parallel.fetch(ours)
    (ref_head,) = ref.classif_params.values()
    ref_bn = reference_checkpoint.to_byol_jax(ref.backbone_params, ref.backbone_state,
                                              model_config, dtype)[1]
    tensors = compare(
        groups(mine.head_params, optax.tree_utils.tree_get(mine.opt_state, "trace"),
               mine.encoder_state),
        groups({"classifier": ref_head},
               {"classifier": dict(*optax.tree_utils.tree_get(ref.classif_opt_state,
                                                              "trace").values())}, ref_bn))
    rel, line = _loss_line("loss", float(_host(logs)["loss"]),
                           float(_first(ref_logs)["train_loss"]))
    print(f"[linear_eval, {n} device(s)] step {step}: {line}\n    worst tensors: "
          f"{_tensor_line(tensors)}", flush=True)
    records.append(dict(step=step, losses={"loss": rel}, tensors=_records(tensors)))
  records[-1]["summary"] = over_target(tensors, TOLERANCES[dtype][1])[0]
  return records


def verdict(runs: dict, dtype: str) -> dict:
  """Worst loss difference over every step, worst tensor difference after the last step.

  A run's tensors pass within the tolerance or, where the reference's own one-ulp spread was
  run (float32 pretraining), when the median, 90th percentile and largest of their
  differences are each at most SPREAD_FACTOR times the reference's against itself
  (`spread_ratios`)."""
  loss_tolerance, tensor_tolerance = TOLERANCES[dtype]
  losses = [(rel, f"{run} step {i} {name}") for run, records in runs.items()
            for i, r in enumerate(records) for name, rel in r["losses"].items()]
  tensors = [(t["relative"], f"{run}: {group} {t['tensor']}") for run, records in runs.items()
             for group, t in records[-1]["tensors"]["worst"].items()]
  (loss, loss_at), (tensor, tensor_at) = max(losses), max(tensors)
  ratios, passed = {}, True
  for run, records in runs.items():
    worst_of_run = max(t["relative"] for t in records[-1]["tensors"]["worst"].values())
    spread = records[-1].get("spread", {})
    if "reference" in spread:
      ratios[run] = [o / r if r > 0 else (0.0 if o == 0 else float("inf"))
                     for o, r in zip(spread["ours"], spread["reference"])]
    passed &= worst_of_run <= tensor_tolerance or (
        run in ratios and max(ratios[run]) <= SPREAD_FACTOR)
  return dict(worst_loss_relative=loss, worst_loss_at=loss_at, worst_tensor_relative=tensor,
              worst_tensor_at=tensor_at, losses_passed=bool(loss <= loss_tolerance),
              tensors_within_tolerance=bool(tensor <= tensor_tolerance),
              spread_ratios=ratios, tensors_passed=bool(passed))


def one_run(args) -> dict:
  """Pretraining and linear-evaluation parity on this process's devices."""
  n = jax.local_device_count()
  if jax.config.jax_enable_x64 != (args.dtype == "float64"):
    raise SystemExit(f"--dtype={args.dtype} needs jax_enable_x64 "
                     f"{'on' if args.dtype == 'float64' else 'off'} (JAX_ENABLE_X64).")
  (byol_experiment, eval_experiment, byol_config, eval_config,
   augmentations) = reference_import.import_reference(args.reference_dir, *REFERENCE_MODULES)
  if args.dtype == "float64":
    patched = []
    _float64_reference(patched)
    print(f"float64: jnp.float32 is float64 in the reference's {', '.join(sorted(patched))}",
          flush=True)
  # The reference's loss calls augmentations.postprocess(inputs, rng) by module attribute.
  augmentations.postprocess = lambda inputs, rng: dict(inputs)

  ref_cfg = byol_config.get_config(args.num_epochs, args.batch_size)
  experiment = reference_import.build(byol_experiment.ByolExperiment, ref_cfg)
  batches = make_batches(args, ref_cfg["num_classes"])
  init = jax.pmap(experiment._make_initial_state, axis_name="i")  # pylint: disable=protected-access
  ref_state0 = _first(init(np.asarray(jax.random.PRNGKey(ref_cfg["random_seed"]))[None],
                           _split(batches[0], 1)))
  stem = next(v["w"].shape[-1] for m, v in ref_state0.online_params.items()
              if m.endswith("/~/initial_conv"))
  config = byol_jax_config(ref_cfg, args.image_size, stem)
  config.compute_dtype = args.dtype
  first = config.warmup_steps - 2 if args.start_step is None else args.start_step
  steps = list(range(first, first + args.steps))
  print(f"[{n} device(s)] ResNet-{config.model.depth} x{config.model.width}, "
        f"{args.image_size} px, batch {args.batch_size}, global_step {steps[0]}..{steps[-1]} "
        f"(warm-up {config.warmup_steps}, max_steps {config.steps}), base lr "
        f"{config.optimizer.base_lr}, weight decay {config.optimizer.weight_decay}, tau "
        f"{config.base_tau}", flush=True)
  runs = {}
  runs[f"pretrain, {n} device(s)"], last = pretrain_parity(
      experiment, ref_state0, config, steps, batches, n)

  eval_cfg = eval_config.get_config(None, args.batch_size)
  eval_cfg["network_config"].update(encoder_class=ref_cfg["network_config"]["encoder_class"],
                                    encoder_config=ref_cfg["network_config"]["encoder_config"])
  evaluation = reference_import.build(eval_experiment.EvalExperiment, eval_cfg)
  runs[f"linear_eval, {n} device(s)"] = linear_eval_parity(
      evaluation, eval_cfg, config.model, last, batches, n, args.dtype)
  return dict(runs=runs, steps=steps, warmup_steps=config.warmup_steps, max_steps=config.steps,
              depth=config.model.depth, width=config.model.width)


def _child_env(n: int, dtype: str) -> dict:
  """This environment on n simulated CPU devices: the reference's linear evaluation divides
  its loss by jax.device_count(), so each run must see exactly its own devices. float64:
  jax_enable_x64 for both codes."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64=str(dtype == "float64"))
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  return env


def main(argv=None):
  args = parse_args(argv)
  if args.one_run:
    figures = one_run(args)
    with open(args.json, "w") as f:
      json.dump(figures, f)
    return figures
  start, commit = (time.perf_counter(), os.times()), reference_import.revision(args.reference_dir)
  print(f"reference: {args.reference_dir} (commit {commit}); jax {jax.__version__}, "
        f"{args.dtype} on the CPU", flush=True)
  runs, settings = {}, dict(
      reference_commit=commit, jax_version=jax.__version__, dtype=args.dtype,
      image_size=args.image_size, batch_size=args.batch_size, devices=args.devices,
      num_epochs=args.num_epochs, load_average_1min_start=os.getloadavg()[0])
  for n in args.devices:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "run.json")
      command = [sys.executable, os.path.abspath(__file__), "--one_run", f"--devices={n}",
                 f"--json={path}", *(f"--{k}={getattr(args, k)}" for k in (
                     "reference_dir", "image_size", "batch_size", "steps", "num_epochs",
                     "dtype")),
                 *([f"--start_step={args.start_step}"] if args.start_step is not None else [])]
      returncode = subprocess.run(command, env=_child_env(n, args.dtype),
                                  check=False).returncode
      if returncode:
        killed = " (killed: out of memory?)" if returncode < 0 else ""
        raise SystemExit(f"The {n}-device run failed with exit status {returncode}{killed}; "
                         "its error is above.")
      with open(path) as f:
        run = json.load(f)
    runs.update(run.pop("runs"))
    settings.update(run)
  end = os.times()
  settings.update(wall_s=time.perf_counter() - start[0],
                  cpu_s=end.children_user + end.children_system
                  - start[1].children_user - start[1].children_system,
                  load_average_1min_end=os.getloadavg()[0],
                  peak_host_memory_mib=resource.getrusage(
                      resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
  loss_tolerance, tensor_tolerance = TOLERANCES[args.dtype]
  figures = dict(settings=settings, runs=runs, **verdict(runs, args.dtype),
                 tolerances=dict(loss=loss_tolerance, tensor=tensor_tolerance,
                                 spread_factor=SPREAD_FACTOR))
  for run, records in runs.items():
    print(f"[{run}] after {args.steps} updates: {records[-1]['summary']}")
  print(f"worst loss difference {figures['worst_loss_relative']:.1e} ({figures['worst_loss_at']})"
        f", worst tensor difference after {args.steps} updates "
        f"{figures['worst_tensor_relative']:.1e} ({figures['worst_tensor_at']}); "
        f"{settings['wall_s']:.0f} s wall, {settings['cpu_s']:.0f} s CPU")
  within = lambda ok, tolerance: f"{'within' if ok else 'NOT within'} {tolerance:g}"
  figures["passed"] = figures["losses_passed"] and figures["tensors_passed"]
  tensors = f"tensors {within(figures['tensors_within_tolerance'], tensor_tolerance)}"
  if not figures["tensors_within_tolerance"] and figures["spread_ratios"]:
    tensors += (", and spread {} as wide as the reference's own one-ulp spread (median / 90th "
                "percentile / largest; at most {:g}x passes)").format("; ".join(
                    f"{' / '.join(f'{r:.1f}x' for r in ratios)} ({run})"
                    for run, ratios in figures["spread_ratios"].items()), SPREAD_FACTOR)
  print(f"{'PASS' if figures['passed'] else 'FAIL'} ({args.dtype}): losses "
        f"{within(figures['losses_passed'], loss_tolerance)} at every step, {tensors} after "
        f"{args.steps} updates", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)
  if not figures["passed"]:
    sys.exit(1)
  return figures


if __name__ == "__main__":
  main(sys.argv[1:])
