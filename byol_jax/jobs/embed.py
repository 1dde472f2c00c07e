"""The embed job: the trained encoder's embeddings of one split -> embeddings.npz.

The images come from `config.data` (a folder or .zip, a TFDS split, an .npz or
the demo sample) and the split `config.embed.split` (default: data.test_split),
so an encoder pretrained on one source embeds another:
`--config.data.source=folder --config.data.path=/my/photos`. They are
preprocessed as at evaluation (centre crop, resized to the pretraining size).
Every file is decoded once first (`data.verify_images="all"`), so an
undecodable one is skipped, counted and named in the summary, and the rows stay
aligned with their names. Every process embeds its rows of each batch;
process 0 streams each gathered batch to disk (`export.NpzRows`), so no
process holds the whole split.

embeddings.npz, read with `np.load(path)` (no pickle), one row per image:
  name        str [N]: the file's path inside the folder or zip; "" for TFDS and .npz
  index       int64 [N]: the row's position in the split
  label       int32 [N]: -1 where unknown
  embedding   float32 [N, D]: the encoder's output (what kNN and the probes read)
  projection  float32 [N, P]: the projector's output, with embed.with_projection
  class_names str [C] (labels index it; empty when unknown), skipped str [K]: the
              files skipped as undecodable
"""

import os

import jax
import numpy as np

from byol_jax.data import datasets, input_pipeline
from byol_jax.evaluate import features
from byol_jax.interop import export
from byol_jax.train import checkpoint, train_step

NAMED_SKIPS = 20  # the summary names this many undecodable files; the npz holds all


def run(config, workdir: str, mesh) -> dict:
  pretrained = config.linear_eval.pretrained_workdir or workdir
  config, nets, params, state = checkpoint.load_pretrained(config, pretrained, mesh)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.verify_images = "all"
  split = config.embed.split or config.data.test_split
  source = datasets.load_source(config, split)
  keys = ("embedding", "projection") if config.embed.with_projection else ("embedding",)
  chief = jax.process_index() == 0
  batches = input_pipeline.eval_batches(config, split, batch_size=config.eval.batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  progress = _progress(batches, source.num_examples, config.eval.batch_size,
                       config.embed.log_every, enabled=chief)
  rows = export.NpzRows() if chief else None
  count = 0

  def write_rows(gathered):  # every process gathers each batch; process 0 keeps it
    nonlocal count
    count += len(gathered["label"])
    if rows is not None:
      rows.append({"label": gathered["label"].astype(np.int32),
                   **{k: gathered[k].astype(np.float32) for k in keys}})

  features.extract(train_step.make_embed_fn(nets, mesh), params, state, progress, mesh,
                   keys=keys, on_batch=write_rows, keep=False)
  path = config.embed.output or os.path.join(workdir, "embeddings.npz")
  if chief:
    names = getattr(source, "names", ())
    skipped = tuple(getattr(source, "skipped_names", ()))
    rows.write(path, {
        "name": np.asarray(names if len(names) == count else [""] * count, str),
        "index": np.arange(count, dtype=np.int64),
        "class_names": np.asarray(getattr(source, "class_names", ()), str),
        "skipped": np.asarray(skipped, str)})
    print(summary(source.description, count, rows.dims(), skipped, path), flush=True)
  return {"path": path, "count": count, "skipped": list(getattr(source, "skipped_names", ()))}


def _progress(batches, total: int, batch_size: int, every: int, enabled: bool):
  """Yields `batches`, printing "[embed] n/total images" about every `every` images."""
  done, next_line = 0, every
  for batch in batches:
    yield batch
    done = min(done + batch_size, total)
    if enabled and every > 0 and done >= next_line and done < total:
      print(f"[embed] {done}/{total} images", flush=True)
      next_line = (done // every + 1) * every


def summary(description: str, count: int, dims: dict, skipped, path: str) -> str:
  dims = ", ".join(f"{k} {dims[k]}-d" for k in ("embedding", "projection") if k in dims)
  text = f"[embed] {count} images of {description} -> {path} ({dims})"
  if skipped:
    named = ", ".join(skipped[:NAMED_SKIPS])
    more = f" and {len(skipped) - NAMED_SKIPS} more (all in its 'skipped')" if len(
        skipped) > NAMED_SKIPS else ""
    text += f"; skipped {len(skipped)} undecodable file(s): {named}{more}"
  return text
