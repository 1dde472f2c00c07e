"""The classifier of linear evaluation and fine-tuning, and its jitted update step.

A linear head on the pretrained encoder's embedding, trained with SGD (Nesterov
momentum, as the reference's byol/configs/eval.py) under a cosine schedule;
the encoder is frozen (stop-gradient, BN in inference mode) unless
`linear_eval.fine_tune`. `jobs/linear_eval.py` runs it; `--job=compile`
compiles the same step.
"""

import math
from typing import Callable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from byol_jax.model import networks, objectives
from byol_jax.train import parallel


class LinearState(NamedTuple):
  step: jax.Array
  encoder_params: hk.Params
  encoder_state: hk.State
  head_params: hk.Params
  opt_state: optax.OptState


class LinearStep(NamedTuple):
  init: Callable      # (pretrained params, pretrained state) -> LinearState (not jitted)
  update: Callable    # jitted (state, batch) -> (state, metrics); donates the state
  predict: Callable   # jitted (state, images) -> logits, BN in inference mode
  schedule: Callable  # step -> learning rate


def make_classifier(model_config, num_classes: int, fine_tune: bool):
  def classify(images, is_training: bool):
    embedding = networks._encoder(model_config)(  # pylint: disable=protected-access
        networks.preprocess(images), is_training and fine_tune)
    if not fine_tune:
      embedding = jax.lax.stop_gradient(embedding)
    return hk.Linear(num_classes, name="classifier")(embedding)  # the reference's init
  return hk.without_apply_rng(hk.transform_with_state(classify))


def split(params):
  """(encoder part, classifier part) of a classifier's parameters."""
  return networks.encoder_subset(params), hk.data_structures.filter(
      lambda m, n, v: m.startswith("classifier"), params)


def num_steps(config, num_train_examples: int) -> int:
  """Steps of `config.linear_eval` over a training split of `num_train_examples`."""
  le = config.linear_eval
  return max(1, math.floor(le.epochs * num_train_examples * le.label_fraction / le.batch_size))


def make_linear_step(config, mesh, *, lr: float, weight_decay: float, steps: int,
                     compute_dtype: Optional[str] = None) -> LinearStep:
  """The step of `config.linear_eval` at learning rate `lr` (for batch 256) over `steps`.

  `compute_dtype` (default: `config.compute_dtype`, the pretraining's) "bfloat16"
  runs the forward and backward in bf16 with float32 parameters and optimizer
  state, as `train_step` does; `predict` computes in it too.
  """
  le = config.linear_eval
  num_classes = config.data.num_classes
  classifier = make_classifier(config.model, num_classes, le.fine_tune)
  schedule = optax.cosine_decay_schedule(lr * le.batch_size / 256, steps)
  optimizer = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(schedule, momentum=le.momentum, nesterov=le.nesterov))
  size = config.data.image_size
  dtype = jnp.dtype(compute_dtype or config.compute_dtype)

  def init(pretrained_params, pretrained_state):
    # Haiku's BatchNorm can only be created in training mode; the fine-tuning
    # variant has the same parameter tree, and the encoder part is replaced below.
    params, _ = make_classifier(config.model, num_classes, True).init(
        jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)), True)
    _, head = split(params)
    encoder_params = networks.encoder_subset(pretrained_params)
    encoder_state = networks.encoder_subset(pretrained_state)
    trainable = {**head, **encoder_params} if le.fine_tune else head
    return LinearState(jnp.zeros((), jnp.int32), encoder_params, encoder_state, head,
                       optimizer.init(trainable))

  def update(state: LinearState, batch):
    images = networks.cast_floating(batch["image"], dtype)

    def loss_fn(trainable):
      enc = {k: v for k, v in trainable.items() if k.startswith("encoder")} or state.encoder_params
      head = {k: v for k, v in trainable.items() if k.startswith("classifier")}
      params = networks.cast_floating({**enc, **head}, dtype)
      logits, new_state = classifier.apply(params, state.encoder_state, images, True)
      loss, hits = objectives.softmax_cross_entropy(logits, batch["label"])
      return loss, (new_state, hits)

    trainable = ({**state.head_params, **state.encoder_params} if le.fine_tune
                 else state.head_params)
    (loss, (new_state, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    enc, head = split(trainable)
    return LinearState(state.step + 1, enc or state.encoder_params,
                       networks.encoder_subset(new_state), head, opt_state), dict(
                           loss=loss, top1=hits["top1"] / batch["label"].shape[0],
                           learning_rate=schedule(state.step))

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  update = jax.jit(update, in_shardings=(repl, data), out_shardings=(repl, repl),
                   donate_argnums=0)

  @jax.jit
  def predict(state: LinearState, images):
    params = networks.cast_floating({**state.encoder_params, **state.head_params}, dtype)
    logits, _ = classifier.apply(params, state.encoder_state,
                                 networks.cast_floating(images, dtype), False)
    return logits

  return LinearStep(init, update, predict, schedule)
