"""The pretraining job's steps compiled for a TPU pod on any host, and what the
compiler says of them: memory, FLOPs, HBM traffic and collectives.

`build_steps` makes the very steps `--job=pretrain` and `--job=linear_eval` run
(`train_step` with `device_augment`, the evaluation forward with the kNN's
scoring program and compare's probe, `linear_step`)
with the mesh over the pod's compile-only devices (`topology.devices`), on
abstract arguments: the shapes of the real state (`jax.eval_shape`) and of the
batches the input pipeline feeds. Nothing is read or allocated. `compile_step`
lowers and compiles one with the TPU compiler and reads its memory and cost
analyses and its collectives off the optimised HLO.
"""

import math
import re
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import fileio
from byol_jax.data import batch as batch_lib
from byol_jax.evaluate import knn, readout
from byol_jax.model import networks
from byol_jax.train import linear_step, optim, parallel, train_step
from byol_jax.views import device_augment

STEPS = ("pretrain", "eval", "linear_eval")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = (.+?) (" + "|".join(_COLLECTIVES) +
                          r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_SIZE = re.compile(r"\(([\d.]+)([KMGT])\)")


class Step(NamedTuple):
  fn: Callable        # jitted
  args: Tuple         # abstract (jax.ShapeDtypeStruct) arguments, with shardings
  examples: int       # global examples (the kNN: queries) per call
  static: Tuple = ()  # (name, value) pairs of the jitted function's static arguments


class OutOfMemoryError(ValueError):
  """The TPU compiler found that a step does not fit a device's HBM."""

  def __init__(self, step: str, message: str):
    super().__init__(f"{step}: {message}")
    self.step, self.message = step, message
    # XLA: "... required for HLO temporaries (1.57T) exceeds available HBM (15.75G)"; its
    # sizes are binary (G = GiB). The first figure is what it needs, the last what it has.
    sizes = [float(n) * 1024.0**" KMGT".index(unit) for n, unit in _SIZE.findall(message)]
    self.needed = sizes[0] if len(sizes) >= 2 else None
    self.available = sizes[-1] if len(sizes) >= 2 else None


def abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_batch(config, kind: str, batch_size: int, mesh, source_side: int = 0) -> dict:
  shapes = batch_lib.shapes(config, kind, batch_size, source_side)
  sharding = parallel.batch_sharded(mesh)
  return {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
          for k, (shape, dtype) in shapes.items()}


def build_steps(config, mesh, source_side: int = 0, steps=STEPS) -> Dict[str, Step]:
  """The jitted steps named in `steps` of a finalised config, on abstract arguments."""
  nets = networks.make_networks(config.model, config.data.num_classes)
  optimizer = optim.make_optimizer(config)
  repl = parallel.replicated(mesh)
  state = abstract(jax.eval_shape(train_step.initial_state_fn(config, nets, optimizer)), repl)
  out = {}
  if "pretrain" in steps:
    update = train_step.make_update_fn(config, nets, optimizer, mesh,
                                       device_augment.make_augment_fn(config))
    batch = abstract_batch(config, "pretrain", config.batch_size, mesh, source_side)
    out["pretrain"] = Step(update, (state, batch), config.batch_size)
  if "eval" in steps:
    images = abstract_batch(config, "eval", config.eval.batch_size, mesh)["image"]
    embed = train_step.make_embed_fn(nets, mesh)
    out["eval"] = Step(embed, (state.online_params, state.online_state, images),
                       config.eval.batch_size)
    dim = jax.eval_shape(embed, *out["eval"].args)["embedding"].shape[-1]
    out.update(evaluation_steps(config, mesh, dim))
  if "linear_eval" in steps:
    le = config.linear_eval
    step = linear_step.make_linear_step(
        config, mesh, lr=le.base_lr, weight_decay=le.weight_decay,
        steps=linear_step.num_steps(config, config.data.num_train_examples))
    linear_state = abstract(jax.eval_shape(step.init, state.online_params, state.online_state),
                            repl)
    batch = abstract_batch(config, "linear", le.batch_size, mesh)
    out["linear_eval"] = Step(step.update, (linear_state, batch), le.batch_size)
  return out


def evaluation_steps(config, mesh, dim: int) -> Dict[str, Step]:
  """The kNN's scoring program and compare's probe over `dim`-d features of the whole
  training split (what `--job=knn` and `--job=compare` hold; periodic evaluation's bank
  is this or a slice of it), sharded as `features.extract` leaves them."""
  devices = mesh.devices.size
  batch = config.eval.batch_size
  rows = math.ceil(config.data.num_train_examples / batch) * batch
  data, repl = parallel.batch_sharded(mesh), parallel.replicated(mesh)

  def sharded(shape, dtype):
    return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=data)

  chunk = knn.query_chunk(rows // devices)
  queries = jax.ShapeDtypeStruct((chunk, dim), np.float32, sharding=repl)
  bank = (sharded((rows, dim), jnp.dtype(config.eval.knn_bank_dtype)), sharded((rows,), "int32"),
          sharded((rows,), "int32"))
  labelled = config.data.num_train_examples
  probe = (sharded((rows, dim), "float32"), sharded((rows,), "int32"), sharded((rows,), "bool"),
           jax.ShapeDtypeStruct((), np.float32, sharding=repl))
  return {
      "knn": Step(knn.local_top_k, (queries, *bank), chunk,
                  (("mesh", mesh), ("k", config.eval.knn_k))),
      "probe": Step(readout.fit_probe, probe, labelled, (
          ("mesh", mesh), ("steps", readout.PROBE_STEPS), ("lr", readout.PROBE_LR),
          ("num_classes", config.data.num_classes), ("seed", config.seed),
          ("local_batch", readout.probe_local_batch(labelled, readout.PROBE_BATCH, devices)))),
  }


def compile_step(name: str, step: Step, hlo_path: Optional[str] = None) -> dict:
  """Compiles one step; its compile time, memory, cost and collectives per device.
  `hlo_path`: where to write the optimised HLO text too."""
  start = time.perf_counter()
  try:
    compiled = step.fn.lower(*step.args, **dict(step.static)).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise OutOfMemoryError(name, _first_line(e)) from None
    raise
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  if cost is None:  # the deviceless CUDA compiler has none: count it from the optimised HLO
    from byol_jax.preflight import gpu_cost  # pylint: disable=g-import-not-at-top
    cost = gpu_cost.step_cost(compiled, hlo)
  if hlo_path:
    fileio.write_text(hlo_path, hlo)
  sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
           "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
           "code": memory.generated_code_size_in_bytes}
  sizes["total"] = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"]
                    + sizes["temporaries"] + sizes["code"])
  return {"compile_s": seconds, "memory": sizes, "flops": float(cost["flops"]),
          "bytes_accessed": float(cost["bytes accessed"]),
          "collectives": collective_bytes(hlo),
          **{k: cost[k] for k in ("convolution_flops", "library_calls") if k in cost}}


def collective_bytes(hlo_text: str) -> Dict[str, dict]:
  """{op: {count, bytes}} of the collectives of an optimised HLO module, per device:
  the bytes of each op's result (an all-reduce's result is the size it reduces)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    shape, op = m.group(1), m.group(2)
    arrays = _ARRAY.findall(shape)
    if m.group(3) and op != "all-reduce":  # async pairs: (operand, result) tuples
      arrays = arrays[len(arrays) // 2:]
    size = sum(_dtype_bytes(dtype) * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dtype, dims in arrays)
    entry = out.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
  return out


def _dtype_bytes(name: str) -> int:
  """HLO element types (pred, s32, bf16, f32, c64, ...) -> bytes."""
  bits = re.search(r"\d+", name)
  return max(1, int(bits.group()) // 8) if bits else 1


def _first_line(error) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
