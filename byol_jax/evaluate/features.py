"""Frozen features of a split, kept where they were computed: sharded over the mesh.

`extract` runs the evaluation forward over a split's batches and keeps each
device's rows on that device: every output is one global array sharded over
the `data` axis, holding N_pad = batches x global batch rows (padding rows
included, `mask` False). Nothing is gathered to the host, so a process holds
only its devices' share, O(N / processes), whatever the split's size.

Row order is device-major: device d holds its rows of batch 0, then of batch 1,
and so on. Each row carries its `position`, its row in the split as the
evaluation batches read it (global batch k, row r -> k x B + r, the order
`process_allgather` of the batches gave), so consumers that need the split's
order (kNN's tie-break, the pictures' samples, embed) have it. Within a
device, positions increase.
"""

from typing import Callable, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from byol_jax.data import stream_index
from byol_jax.train import parallel

# Rows of each split that `extract(sample=...)` also returns on the host (the
# pictures' queries and map): a constant, whatever the split's size.
HOST_SAMPLE = 2000


class Features(dict):
  """{key: global array [N_pad, ...] sharded on `data`} with `label`, `mask`, `position`;
  `count` = valid rows, `sample` = the first valid rows on the host (numpy), if asked."""

  count: int = 0
  sample: Optional[Dict[str, np.ndarray]] = None


def extract(embed_fn: Callable, params, state, batches: Iterable[dict], mesh,
            keys=("embedding", "logits", "projection"), sample: int = 0,
            on_batch: Optional[Callable[[Dict[str, np.ndarray]], None]] = None,
            keep: bool = True) -> Features:
  """Runs `embed_fn` over `batches` (this process's rows of each global batch, as
  `input_pipeline.eval_batches` yields them); returns the sharded `Features`.

  `sample` > 0 also keeps the first `sample` valid rows on every host;
  `on_batch`, when given, is called on every process with each global batch's
  valid rows gathered to the host (numpy, in split order): streaming writers
  (the embed job) hold one batch at a time; with `keep` False they are all that is
  kept (the result holds no arrays).
  """
  process, processes = jax.process_index(), jax.process_count()
  per_device = {}  # key -> {device: [that device's rows of each batch]}
  host = {k: [] for k in (*keys, "label", "position")}
  kept = 0
  for step, local in enumerate(batches):
    rows = len(local["mask"])
    positions = stream_index.batch_positions(step, rows * processes, process, processes)
    local = dict(local, position=positions.astype(np.int32))
    batch = parallel.to_global(local, mesh)
    out = embed_fn(params, state, batch["image"])
    out = {**{k: out[k] for k in keys}, **{k: batch[k] for k in ("label", "mask", "position")}}
    for key, array in out.items() if keep else ():
      for shard in array.addressable_shards:
        per_device.setdefault(key, {}).setdefault(shard.device, []).append(shard.data)
    if on_batch is not None or kept < sample:
      gathered = multihost_utils.process_allgather({k: out[k] for k in (*host, "mask")},
                                                   tiled=True)
      gathered = {k: np.asarray(gathered[k])[np.asarray(gathered["mask"], bool)] for k in host}
      if on_batch is not None:
        on_batch(gathered)
      if kept < sample:
        for key in host:
          host[key].append(gathered[key][:sample - kept])
        kept += len(gathered["label"])
  features = Features({key: _assemble(shards, mesh) for key, shards in per_device.items()})
  # Every forward done before the first collective: see knn._top_k.
  jax.block_until_ready(dict(features))
  features.count = int(jnp.sum(features["mask"])) if features else 0
  if sample:
    features.sample = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in host.items()}
  return features


def _assemble(shards: Dict, mesh) -> jax.Array:
  """Each device's list of row blocks -> one global array sharded on `data`."""
  arrays = [jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]
            for blocks in shards.values()]
  rows = arrays[0].shape[0] * mesh.devices.size
  return jax.make_array_from_single_device_arrays((rows, *arrays[0].shape[1:]),
                                                  parallel.batch_sharded(mesh), arrays)


def valid(features: Dict) -> jax.Array:
  """The rows that count: not padding, labelled (-1 marks unlabelled and padding rows)."""
  return features["mask"] & (features["label"] >= 0)
