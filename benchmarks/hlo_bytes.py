r"""Where a compiled step's HBM traffic comes from: bytes per op of an optimised HLO.

    python benchmarks/hlo_bytes.py STEP.hlo.txt [--top=25] [--json=out.json]

reads the text of a compiled program (`compiled.as_text()`; benchmarks/tpu_scale.py
--hlo_dir writes one per step) and adds up, for every instruction the device runs
(the entry computation and the bodies of its loops; not the inside of fusions,
which stay on chip), the bytes of its operands and of its result, as XLA's
cost analysis does. TPU layouts are tiled, so each array is counted at its
padded size (tiles of the `T(a,b)` in its layout) and at its logical size.

It prints the total, then the bytes grouped by
* the memory space each array is in: 0 is HBM; the others (`S(n)` in its layout)
  are on-chip memories that XLA's memory-space assignment moves arrays into
  (e.g. v4's CMEM), counted by XLA's cost analysis all the same;
* the element type of each array (bf16, f32, ...; moves between spaces left out);
* what the op is: convolution fusion, loop/input fusion (elementwise,
  reductions), copy (layout changes), collective, ...;
* where it comes from, read off the op's `op_name` metadata: the forward or the
  backward (`transpose(jvp(...))`) pass of the encoder / projector / predictor,
  the augmentation (`vmap`), the optimizer, ...;
* the `--top` single ops.

Loop bodies are counted once per iteration when XLA records a known trip count.
"""

import argparse
import collections
import json
import math
import re
import sys

_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](?:\{([^}]*)\})?")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\{\s*$")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
               "conditional", "after-all", "opt-barrier", "partition-id", "replica-id"}
# Memory-space moves (prefetches of weights, slices into on-chip memory): read + write of
# their destination, the first element of a copy-start's tuple, the second of a slice-start's.
_ASYNC_MOVES = {"copy-start": 0, "slice-start": 1}


def element_bytes(dtype: str) -> float:
  if dtype == "pred":
    return 1
  bits = re.search(r"\d+", dtype)
  return int(bits.group()) / 8 if bits else 1


def array_bytes(dtype: str, dims: str, layout: str, padded: bool) -> float:
  shape = [int(d) for d in dims.split(",") if d]
  if padded and layout and ":" in layout and shape:
    minor_to_major, _, tiling = layout.partition(":")
    order = [int(i) for i in minor_to_major.split(",") if i.strip()]
    tile = re.match(r"T\(([\d,]+)\)", tiling)
    if tile and len(order) == len(shape):
      sizes = [int(t) for t in tile.group(1).split(",")]
      # The tile covers the most-minor dimensions, its last entry the most minor.
      for size, dim in zip(reversed(sizes), order):
        shape[dim] = -(-shape[dim] // size) * size
  return math.prod(shape) * element_bytes(dtype)


def shape_bytes(shape: str, padded: bool) -> float:
  return sum(array_bytes(d, dims, layout or "", padded) for d, dims, layout in _ARRAY.findall(shape))


def padded_arrays(shape: str):
  """(memory space, element type, padded bytes) of each array of a shape; the space is the n
  of `S(n)` in its layout, 0 without one."""
  for dtype, dims, layout in _ARRAY.findall(shape):
    space = re.search(r"S\((\d+)\)", layout or "")
    yield (f"memory space {space.group(1) if space else 0}", dtype,
           array_bytes(dtype, dims, layout, True))


def split_instruction(line: str):
  """'%x = SHAPE op(operands), attrs' -> (name, shape, opcode, operand names, attrs) or None."""
  m = re.match(r"^\s*(?:ROOT\s+)?%(\S+) = ", line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 2:]
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  depth, start = 0, op.end() - 1
  for i in range(start, len(rest)):
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", rest[start:i + 1])
  return m.group(1), shape, op.group(1), operands, rest[i + 1:]


def parse(text: str):
  """{computation: [instruction tuples]}, the entry's name, and every name's shape."""
  computations, entry, current, shapes = {}, None, None, {}
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    inst = split_instruction(line) if current else None
    if inst:
      computations[current].append(inst)
      shapes[(current, inst[0])] = inst[1]
  return computations, entry, shapes


def source(attrs: str) -> str:
  """The pass and network an op belongs to, from its op_name metadata."""
  m = re.search(r'op_name="([^"]*)"', attrs)
  name = m.group(1) if m else ""
  backward = "transpose(" in name
  for part in ("encoder", "projector", "predictor", "probe", "classifier"):
    if part in name:
      layer = re.search(part + r"/(\w+)", name)
      return f"{'backward' if backward else 'forward'} {part}" + (
          f" {layer.group(1).split('_')[0]}" if part == "encoder" and layer else "")
  if "vmap" in name or "while" in name:
    return "augmentation"
  if re.search(r"lars|sgd|ema|optax|add_decayed|trace|scale_by", name):
    return "optimizer / EMA"
  return "other: " + ("/".join(name.split("/")[1:3]) or "no op_name (XLA's own)")


def kind(opcode: str, attrs: str) -> str:
  if opcode == "fusion":
    k = re.search(r"kind=(\w+)", attrs)
    calls = re.search(r"calls=%(\S+?)[,\s]", attrs)
    label = k.group(1) if k else "fusion"
    if calls and "convolution" in calls.group(1):
      label += " (convolution)"
    return label
  return opcode


def analyse(text: str, top: int = 25) -> dict:
  computations, entry, shapes = parse(text)
  totals = collections.Counter()
  by_kind, by_source, by_space, by_dtype, ops = (
      collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter(),
      [])

  def walk(name: str, times: float):
    for inst_name, shape, opcode, operands, attrs in computations.get(name, []):
      if opcode == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        body = re.search(r"body=%(\S+?)[,\s]", attrs + " ")
        if body:
          walk(body.group(1), times * (int(trips.group(1)) if trips else 1))
        continue
      for key in ("to_apply", "branch_computations", "true_computation", "false_computation"):
        if opcode in ("call", "conditional") and key + "=" in attrs:
          for called in re.findall(r"%([\w.\-]+)", attrs.split(key + "=")[1].split("}")[0]):
            walk(called, times)
      if opcode in _NO_TRAFFIC or opcode.endswith("-done") or "ConcatBitcast" in attrs:
        continue
      sizes = {}
      for padded in (True, False):
        if opcode in _ASYNC_MOVES:
          moved = _ARRAY.findall(shape[1:] if shape.startswith("((") else shape)
          dest = moved[_ASYNC_MOVES[opcode]] if opcode == "copy-start" else moved[-2]
          sizes[padded] = times * 2 * array_bytes(dest[0], dest[1], dest[2], padded)
          if padded:
            by_space["moves between memory spaces"] += sizes[padded]
          continue
        operand_bytes = sum(shape_bytes(shapes.get((name, o), ""), padded) for o in operands)
        sizes[padded] = times * (shape_bytes(shape, padded) + operand_bytes)
      if opcode not in _ASYNC_MOVES:
        for part in [shape] + [shapes.get((name, o), "") for o in operands]:
          for space, dtype, size in padded_arrays(part):
            by_space[space] += times * size
            by_dtype[dtype] += times * size
      totals["padded"] += sizes[True]
      totals["logical"] += sizes[False]
      where = "moves between memory spaces" if opcode in _ASYNC_MOVES else source(attrs)
      by_kind[kind(opcode, attrs)] += sizes[True]
      by_source[where] += sizes[True]
      ops.append((sizes[True], inst_name, kind(opcode, attrs), where, shape[:90]))

  walk(entry, 1)
  ops.sort(reverse=True)
  return {"bytes_padded": totals["padded"], "bytes_logical": totals["logical"],
          "by_space": dict(by_space.most_common()),
          "by_dtype": dict(by_dtype.most_common()),
          "by_kind": dict(by_kind.most_common()), "by_source": dict(by_source.most_common()),
          "top_ops": [dict(bytes=b, name=n, kind=k, source=s, shape=sh)
                      for b, n, k, s, sh in ops[:top]]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("hlo")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  with open(args.hlo) as f:
    result = analyse(f.read(), args.top)
  total = result["bytes_padded"]
  print(f"{args.hlo}: {total / 1e9:.2f} GB padded to TPU tiles, "
        f"{result['bytes_logical'] / 1e9:.2f} GB logical")
  for title in ("by_space", "by_dtype", "by_kind", "by_source"):
    print(f"\n{title.replace('_', ' ')}:")
    for key, value in result[title].items():
      if value / total >= 0.002:
        print(f"  {value / 1e9:8.2f} GB {value / total:6.1%}  {key}")
  print(f"\ntop {args.top} ops:")
  for op in result["top_ops"]:
    print(f"  {op['bytes'] / 1e9:7.3f} GB  {op['kind']:<22} {op['source']:<28} {op['shape']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
