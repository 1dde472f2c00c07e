"""Linear evaluation (frozen encoder) and fine-tuning of a pretrained encoder.

Paper protocol: a linear classifier on the frozen embedding, trained with SGD
and Nesterov momentum under a cosine schedule on random-resized-crop + flip
views, reported as top-1/top-5 on the test split. With lr and weight-decay
grids, each pair is trained and the reported test accuracy is the one of the
pair that scored best on the held-out validation split. `fine_tune=True` trains
the encoder too (BatchNorm in training mode); with `label_fraction` 0.01 / 0.1
that is the semi-supervised protocol.
"""

import itertools
import json
import math
import os
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from absl import logging

from byol_jax import fileio, reporting
from byol_jax.data import datasets, input_pipeline
from byol_jax.model import networks, objectives
from byol_jax.train import checkpoint, loop, parallel

# What a resumed classifier run must share with its checkpoint (`checkpoint.settings`);
# lr and weight decay name the run's folder.
TRAJECTORY = ("seed", "linear_eval.batch_size", "linear_eval.epochs", "linear_eval.label_fraction",
              "linear_eval.fine_tune", "linear_eval.momentum", "linear_eval.nesterov",
              "data.source", "data.name", "data.path", "data.train_split", "data.image_size",
              "data.num_train_examples")

class LinearState(NamedTuple):
  step: jax.Array
  encoder_params: hk.Params
  encoder_state: hk.State
  head_params: hk.Params
  opt_state: optax.OptState


def make_classifier(model_config, num_classes: int, fine_tune: bool):
  def classify(images, is_training: bool):
    embedding = networks._encoder(model_config)(networks.preprocess(images), is_training and fine_tune)  # pylint: disable=protected-access
    if not fine_tune:
      embedding = jax.lax.stop_gradient(embedding)
    return hk.Linear(num_classes, name="classifier")(embedding)  # the reference's init
  return hk.without_apply_rng(hk.transform_with_state(classify))


def _split(params):
  return networks.encoder_subset(params), hk.data_structures.filter(
      lambda m, n, v: m.startswith("classifier"), params)


def make_optimizer(le, lr: float, weight_decay: float, steps: int):
  """(optimizer, schedule): weight decay, then SGD with `le`'s momentum under a cosine
  decay of lr x batch/256 to 0 over `steps`, read at optax's step count."""
  schedule = optax.cosine_decay_schedule(lr * le.batch_size / 256, steps)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=le.momentum, nesterov=le.nesterov)), schedule


def make_update_fn(classifier, optimizer, schedule, fine_tune: bool, mesh):
  """Jitted `update(LinearState, {image, label}) -> (LinearState, metrics)`: one step of the
  classifier (and of the encoder when `fine_tune`), the batch sharded over `mesh`."""

  def update(state: LinearState, batch):
    images = batch["image"]

    def loss_fn(trainable):
      enc = {k: v for k, v in trainable.items() if k.startswith("encoder")} or state.encoder_params
      head = {k: v for k, v in trainable.items() if k.startswith("classifier")}
      logits, new_state = classifier.apply({**enc, **head}, state.encoder_state, images, True)
      loss, hits = objectives.softmax_cross_entropy(logits, batch["label"])
      return loss, (new_state, hits)

    trainable = ({**state.head_params, **state.encoder_params} if fine_tune
                 else state.head_params)
    (loss, (new_state, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    enc, head = _split(trainable)
    return LinearState(state.step + 1, enc or state.encoder_params,
                       networks.encoder_subset(new_state), head, opt_state), dict(
                           loss=loss, top1=hits["top1"] / batch["label"].shape[0],
                           learning_rate=schedule(state.step))

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(update, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=0)


def train_and_evaluate(config, pretrained, mesh, *, lr: float, weight_decay: float,
                       workdir: str, allow_changed_resume: bool = False) -> dict:
  """Trains one classifier with (lr, weight_decay) on the pretrained (params, state);
  returns val and test accuracy."""
  le = config.linear_eval
  num_classes = config.data.num_classes
  num_train, _ = datasets.dataset_info(config, config.data.train_split)
  steps = max(1, math.floor(le.epochs * num_train * le.label_fraction / le.batch_size))
  parallel.check_batch_size(le.batch_size, mesh)
  classifier = make_classifier(config.model, num_classes, le.fine_tune)
  optimizer, schedule = make_optimizer(le, lr, weight_decay, steps)

  size = config.data.image_size

  def init():
    # Haiku's BatchNorm can only be created in training mode; the fine-tuning
    # variant has the same parameter tree, and the encoder part is replaced below.
    params, _ = make_classifier(config.model, num_classes, True).init(
        jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)), True)
    _, head = _split(params)
    encoder_params = networks.encoder_subset(pretrained[0])
    encoder_state = networks.encoder_subset(pretrained[1])
    trainable = {**head, **encoder_params} if le.fine_tune else head
    return LinearState(jnp.zeros((), jnp.int32), encoder_params, encoder_state, head,
                       optimizer.init(trainable))

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
  update = make_update_fn(classifier, optimizer, schedule, le.fine_tune, mesh)

  @jax.jit
  def predict(state: LinearState, images):
    logits, _ = classifier.apply({**state.encoder_params, **state.head_params},
                                 state.encoder_state, images, False)
    return logits

  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=1)
  settings = checkpoint.settings(config.to_dict(), TRAJECTORY)
  start, restored = ckpt.restore({"state": checkpoint.abstract(state)},
                                 expected_settings=settings, allow_changed=allow_changed_resume)
  if restored is not None:
    state = restored["state"]
  start = start or 0
  reporter = reporting.Reporter(workdir, total_steps=steps, batch_size=le.batch_size,
                                enabled=jax.process_index() == 0, name="linear_eval")
  batches = input_pipeline.linear_train_batches(
      config, batch_size=le.batch_size, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), label_fraction=le.label_fraction)
  with ckpt:
    state, last = loop.train(
        state, update=update, batches=batches, mesh=mesh, start=start, total=steps,
        every=loop.Every(config.log_every_steps, config.checkpoint.every_steps),
        reporter=reporter, ckpt=ckpt, to_items=lambda s: {"state": s},
        meta={"lr": lr, "weight_decay": weight_decay, "settings": settings},
        divergence_advice="Lower --config.linear_eval.base_lr and rerun (a learning rate trains "
                          "in a folder of its own).")
  if "preempted_at_step" in last:
    return last

  def accuracy(split):
    hits = {"top1": 0, "top5": 0}
    total = 0
    for local in input_pipeline.eval_batches(config, split, batch_size=le.batch_size,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count()):
      batch = parallel.to_global(local, mesh)
      labels = jnp.where(batch["mask"], batch["label"], -1)
      counts = objectives.topk_correct(predict(state, batch["image"]), labels)
      hits = {k: hits[k] + int(counts[k]) for k in hits}
      total += int(jnp.sum(labels >= 0))
    return {k: v / max(total, 1) for k, v in hits.items()}

  test = accuracy(config.data.test_split)
  result = {"lr": lr, "weight_decay": weight_decay, "test_top1": test["top1"],
            "test_top5": test["top5"], "steps": steps}
  if le.lr_grid or le.weight_decay_grid:
    val = accuracy(config.data.val_split)
    result.update(val_top1=val["top1"], val_top5=val["top5"])
  return result


def run(config, workdir: str, mesh, allow_changed_resume: bool = False) -> dict:
  """Evaluates the pretrained encoder (of `linear_eval.pretrained_workdir`, default
  `workdir`); results under workdir."""
  source = config.linear_eval.pretrained_workdir or workdir
  config, _, params, net_state = checkpoint.load_pretrained(config, source, mesh)
  le = config.linear_eval
  name = "fine_tune" if le.fine_tune else "linear_eval"
  if le.label_fraction < 1.0:
    name += f"_{le.label_fraction:g}"
  lrs = tuple(le.lr_grid) or (le.base_lr,)
  wds = tuple(le.weight_decay_grid) or (le.weight_decay,)
  results = []
  for lr, wd in itertools.product(lrs, wds):
    run_dir = os.path.join(workdir, name, f"lr{lr:g}_wd{wd:g}")
    result = train_and_evaluate(config, (params, net_state), mesh, lr=lr, weight_decay=wd,
                                workdir=run_dir, allow_changed_resume=allow_changed_resume)
    if "preempted_at_step" in result:
      return result
    results.append(result)
    logging.info("%s lr=%g wd=%g: %s", name, lr, wd, results[-1])
  best = max(results, key=lambda r: r.get("val_top1", r["test_top1"]))
  summary = {"best": best, "all": results}
  print(f"[{name}] test top-1 {best['test_top1']:.4f} top-5 {best['test_top5']:.4f} "
        f"(lr={best['lr']:g}, weight_decay={best['weight_decay']:g})", flush=True)
  if jax.process_index() == 0:
    fileio.write_text(os.path.join(workdir, f"{name}_results.json"), json.dumps(summary, indent=2))
  return best
