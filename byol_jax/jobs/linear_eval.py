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
import os

import jax
import jax.numpy as jnp
from absl import logging

from byol_jax import config_fields, fileio, reporting
from byol_jax.data import datasets, input_pipeline
from byol_jax.model import objectives
from byol_jax.train import checkpoint, linear_step, loop, parallel


def train_and_evaluate(config, pretrained, mesh, *, lr: float, weight_decay: float,
                       workdir: str, allow_changed_resume: bool = False) -> dict:
  """Trains one classifier with (lr, weight_decay) on the pretrained (params, state);
  returns val and test accuracy."""
  le = config.linear_eval
  num_train, _ = datasets.dataset_info(config, config.data.train_split)
  steps = linear_step.num_steps(config, num_train)
  parallel.check_batch_size(le.batch_size, mesh)
  step = linear_step.make_linear_step(config, mesh, lr=lr, weight_decay=weight_decay,
                                      steps=steps)
  state = jax.jit(step.init, out_shardings=parallel.replicated(mesh))(*pretrained)

  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=1)
  settings = config_fields.settings("linear_eval", config.to_dict())
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
        state, update=step.update, batches=batches, mesh=mesh, start=start, total=steps,
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
      counts = objectives.topk_correct(step.predict(state, batch["image"]), labels)
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
