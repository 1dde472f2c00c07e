"""Weighted kNN over a bank sharded on every device (cosine similarity, votes exp(sim / T)).

The training features (the bank) stay sharded over the mesh's `data` axis as
`features.extract` left them. For each chunk of queries, every device scores
the chunk against its own rows and keeps its local top-k; the k candidates of
every device (similarity, split position, label) are gathered, and the global
top-k is the first k of them sorted by (-similarity, position): exactly the
k that one `top_k` over the whole bank in split order picks, ties included
(it keeps the lower index, and positions increase within each device's rows).
Labels travel with the candidates: no N x classes one-hot anywhere. Votes are
summed per class by a scatter-add over the k neighbours.

Per device, a chunk holds its bank rows (N / devices x D, float32 or bfloat16:
`eval.knn_bank_dtype`), a chunk x N / devices similarity block, and
devices x k candidates per query; the chunk is sized so the block stays within
`SIMILARITY_BYTES`.
"""

import functools
import math
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from byol_jax.errors import ConfigError
from byol_jax.evaluate import features as features_lib
from byol_jax.model import objectives
from byol_jax.train import parallel

MAX_CHUNK = 1024                  # queries per call
SIMILARITY_BYTES = 256 * 2**20    # per device: one chunk's similarity block
BANK_DTYPES = ("float32", "bfloat16")
_AXIS = parallel.DATA_AXIS


def query_chunk(bank_rows_per_device: int) -> int:
  """Queries per call: up to MAX_CHUNK, fewer where the similarity block would
  pass SIMILARITY_BYTES."""
  return int(max(1, min(MAX_CHUNK, SIMILARITY_BYTES // (4 * max(bank_rows_per_device, 1)))))


def bytes_per_device(bank_rows: int, dim: int, devices: int, k: int,
                     bank_dtype: str = "float32") -> int:
  """What the kNN holds per device: its bank rows, one chunk's similarities, the candidates."""
  rows = math.ceil(bank_rows / devices)
  chunk = query_chunk(rows)
  return (rows * (dim * np.dtype(jnp.dtype(bank_dtype)).itemsize + 8)
          + chunk * rows * 4 + 3 * chunk * min(k, rows) * devices * 4)


def check_fits(bank_rows: int, dim: int, device, devices: int, k: int, bank_dtype: str) -> None:
  """A one-line ConfigError when the kNN over `devices` cannot fit the memory of `device`
  (one of this process's; where JAX knows its size)."""
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  need = bytes_per_device(bank_rows, dim, devices, k, bank_dtype)
  if limit and need > 0.9 * limit:
    gib = 2.0**30
    raise ConfigError(
        f"The kNN over {bank_rows} training features of {dim} dims needs {need / gib:.2f} GiB "
        f"per device; a {device.device_kind} has {limit / gib:.2f} GiB. Use "
        "--config.eval.knn_bank_dtype=bfloat16, a smaller bank (--config.eval.knn_train_split, "
        "e.g. 'train[:10%]'), or more devices.")


def bank(features: Dict, bank_dtype: str = "float32") -> Dict:
  """The kNN bank of sharded features: unit rows in `bank_dtype`, label (-1 where not
  counted: padding, unlabelled), position."""
  if bank_dtype not in BANK_DTYPES:
    raise ConfigError(f"eval.knn_bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}.")
  unit = _normalize(features["embedding"], jnp.dtype(bank_dtype))
  labels = _where_valid(features["label"], features["mask"])
  return {"embedding": unit, "label": labels, "position": features["position"]}


@functools.partial(jax.jit, static_argnums=1)
def _normalize(x, dtype):
  return objectives.l2_normalize(x.astype(jnp.float32)).astype(dtype)


@jax.jit
def _where_valid(labels, mask):
  return jnp.where(mask & (labels >= 0), labels, -1)


def _top_k(queries, bank_rows, bank_labels, bank_positions, *, mesh, k: int):
  """Global top-k of unit `queries` (replicated) over the sharded bank, nearest first:
  (similarities, labels, positions), each [Q, k]; -inf / -1 fill where the bank has
  fewer than k rows.

  Each device's local top-k (no collective), then the merge, each program finished
  before the next starts: on XLA's CPU runtime a collective that some devices reach
  while another still sorts blocks the threads that sort needs (a deadlock, seen
  with 8 simulated devices and a top-k as long as the shard).
  """
  candidates = _settled(local_top_k(queries, bank_rows, bank_labels, bank_positions,
                                     mesh=mesh, k=k))
  return _settled(_merge(*candidates, k=k))


def _settled(tree):
  return jax.block_until_ready(tree)


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def local_top_k(queries, rows, labels, positions, *, mesh, k: int):
  """Each device's k nearest of its rows: (-similarity, position, label), [Q, devices x k]
  sharded over the second axis. The kNN's heavy program: it holds the bank and the
  similarity block (what `--job=compile` compiles as the "knn" step)."""

  def local(q, rows, labels, positions):
    sims = jnp.einsum("qd,nd->qn", q.astype(rows.dtype), rows,
                      preferred_element_type=jnp.float32)
    sims = jnp.where(labels[None, :] >= 0, sims, -jnp.inf)
    top, index = jax.lax.top_k(sims, min(k, rows.shape[0]))
    return -top, positions[index], labels[index]

  spec = P(None, _AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(_AXIS), P(_AXIS), P(_AXIS)),
                       out_specs=(spec, spec, spec))(queries, rows, labels, positions)


@functools.partial(jax.jit, static_argnames="k")
def _merge(neg_sims, positions, labels, *, k: int):
  """The first k candidates by (-similarity, position): the global top-k, ties to the
  lower position."""
  neg, pos, lab = jax.lax.sort((neg_sims, positions, labels), dimension=1, num_keys=2)
  keep = min(k, neg.shape[1])
  return -neg[:, :keep], lab[:, :keep], pos[:, :keep]


@functools.partial(jax.jit, static_argnames="chunk")
def _query_chunk(queries, labels, start, first, *, chunk):
  """Unit queries [start, start + chunk), replicated, and their labels (-1 before `first`:
  the previous chunk counted them)."""
  q = objectives.l2_normalize(jax.lax.dynamic_slice_in_dim(queries, start, chunk)
                              .astype(jnp.float32))
  labels = jax.lax.dynamic_slice_in_dim(labels, start, chunk)
  return q, jnp.where(start + jnp.arange(chunk) >= first, labels, -1)


@functools.partial(jax.jit, static_argnames="num_classes")
def _hits(sims, neighbour_labels, labels, temperature, *, num_classes):
  """Top-1 / top-5 hits of weighted votes exp(sim / T), summed per class."""
  weights = jnp.exp(sims / temperature)  # 0 for the -inf fill
  rows = jnp.arange(sims.shape[0])[:, None]
  votes = jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[
      rows, jnp.maximum(neighbour_labels, 0)].add(weights)
  return objectives.topk_correct(votes, labels)


def knn_accuracy(train: Dict, test: Dict, mesh, *, num_classes: int, k: int = 200,
                 temperature: float = 0.1, bank_dtype: str = "float32",
                 chunk: Optional[int] = None) -> Dict[str, float]:
  """Weighted kNN top-1 / top-5 of the valid `test` rows against the valid `train`
  rows, both sharded `features.Features` (or `from_arrays`)."""
  rows = bank(train, bank_dtype)
  total = train["embedding"].shape[0]
  check_fits(total, train["embedding"].shape[1], mesh.local_devices[0], mesh.devices.size, k,
             bank_dtype)
  queries, labels = test["embedding"], _where_valid(test["label"], test["mask"])
  valid = max(int(jnp.sum(labels >= 0)), 1)
  n = queries.shape[0]
  if not n:
    return {"top1": 0.0, "top5": 0.0}
  chunk = min(chunk or query_chunk(total // mesh.devices.size), n)
  hits = {"top1": 0, "top5": 0}
  for first in range(0, n, chunk):
    q, q_labels = _settled(_query_chunk(queries, labels, min(first, n - chunk), first,
                                        chunk=chunk))
    sims, neighbour_labels, _ = _top_k(q, rows["embedding"], rows["label"], rows["position"],
                                       mesh=mesh, k=k)
    counts = _settled(_hits(sims, neighbour_labels, q_labels, temperature,
                            num_classes=num_classes))
    hits = {key: hits[key] + int(counts[key]) for key in hits}
  return {key: int(value) / valid for key, value in hits.items()}


def nearest(train: Dict, queries: np.ndarray, mesh, k: int):
  """(split positions, labels), each [Q, k], of the k most cosine-similar valid `train`
  rows of each query (host numpy), nearest first."""
  rows = bank(train)
  q = objectives.l2_normalize(jnp.asarray(queries, jnp.float32))
  _, labels, positions = _top_k(q, rows["embedding"], rows["label"], rows["position"],
                                mesh=mesh, k=k)
  return np.asarray(positions), np.asarray(labels)


def from_arrays(embedding, labels, mesh) -> features_lib.Features:
  """Host features and labels (one process) -> sharded `Features` in row order,
  padded to a multiple of the device count."""
  embedding, labels = np.asarray(embedding, np.float32), np.asarray(labels, np.int32)
  n = len(labels)
  pad = -n % mesh.devices.size
  sharding = parallel.batch_sharded(mesh)
  if pad:
    embedding = np.concatenate([embedding, np.zeros((pad, *embedding.shape[1:]), np.float32)])
  arrays = {"embedding": embedding,
            "label": np.concatenate([labels, -np.ones(pad, np.int32)]),
            "mask": np.arange(n + pad) < n,
            "position": np.arange(n + pad, dtype=np.int32)}
  out = features_lib.Features({k: jax.device_put(v, sharding) for k, v in arrays.items()})
  out.count = n
  return out
