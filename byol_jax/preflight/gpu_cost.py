"""FLOPs, bytes and library calls of a step compiled for an NVIDIA GPU without one.

The deviceless CUDA compiler has no cost analysis (`Compiled.cost_analysis()` is
None). XLA's generic HLO cost analysis, run on the optimised module with the CPU
client, counts every fusion (Triton GEMMs included) but none of the library
custom-calls: cuDNN convolutions and cuBLAS GEMMs. Their FLOPs and bytes are
counted here from the shapes in the optimised HLO text:

* a cuDNN convolution (forward, input-gradient, filter-gradient) does
  2 x (output elements / output features) x filter elements multiply-adds' worth,
  its shapes read as cuDNN reads them: forward (x, w) -> y; backward input
  (dy, w) -> dx; backward filter (x, dy) -> dw; its `dim_labels` name the
  output's feature dimension;
* a cuBLAS GEMM does 2 x result elements x the contracted size;
* each reads its operands and writes its first result.

A custom-call inside a loop body is counted once.
"""

import re
from typing import Dict

import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_FUSION_KIND = re.compile(r'"fusion_backend_config":\{"kind":"([^"]+)"')


def _arrays(shape: str):
  """[(dtype, dims)] of an HLO shape (a tuple gives several)."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", shape))]


def _nbytes(array) -> int:
  dtype, dims = array
  bits = re.search(r"\d+", dtype)
  return max(1, int(bits.group()) // 8 if bits else 1) * int(np.prod(dims, dtype=np.int64))


def _operands(args: str):
  """The operand names of an instruction's argument list (up to its closing parenthesis)."""
  depth, end = 1, len(args)
  for i, ch in enumerate(args):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", args[:end])


def library_calls(hlo_text: str) -> dict:
  """{flops, bytes, convolution_flops, calls: {cudnn, cublas, triton, other}} of the
  library custom-calls and Triton fusions of an optimised GPU HLO module."""
  shapes, calls = {}, []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, shape, op, rest = m.groups()
      shapes[name] = _arrays(shape)
      if op in ("custom-call", "fusion"):
        calls.append((op, shape, rest))
  out = {"flops": 0.0, "bytes": 0.0, "convolution_flops": 0.0,
         "calls": {"cudnn": 0, "cublas": 0, "triton": 0, "other": 0}}
  for op, shape, rest in calls:
    if op == "fusion":
      kind = _FUSION_KIND.search(rest)
      if kind and "triton" in kind.group(1):
        out["calls"]["triton"] += 1
      continue
    target = _TARGET.search(rest)
    target = target.group(1) if target else ""
    operands = [shapes.get(n, [None])[0] for n in _operands(rest)]
    result = _arrays(shape)[0]
    if target.startswith("__cudnn$conv"):
      flops = _conv_flops(target, operands, result, rest)
      out["convolution_flops"] += flops
      out["calls"]["cudnn"] += 1
    elif target.startswith("__cublas$"):
      flops = _gemm_flops(operands, result, rest)
      out["calls"]["cublas"] += 1
    else:
      out["calls"]["cudnn" if target.startswith("__cudnn") else
                   "triton" if "triton" in target else "other"] += 1
      continue
    out["flops"] += flops
    out["bytes"] += _nbytes(result) + sum(_nbytes(a) for a in operands if a)
  return out


def _conv_flops(target: str, operands, result, rest: str) -> float:
  labels = _DIM_LABELS.search(rest)
  if labels is None or len(operands) < 2 or None in operands[:2]:
    raise ValueError(f"cannot read the convolution {target}: {rest[:200]}")
  if target == "__cudnn$convBackwardInput":
    filt, output = operands[1], operands[0]
  elif target == "__cudnn$convBackwardFilter":
    filt, output = result, operands[1]
  else:  # forward, with or without a fused bias / activation
    filt, output = operands[1], result
  features = output[1][labels.group(3).index("f")]
  return 2.0 * np.prod(output[1], dtype=np.float64) / features * np.prod(filt[1],
                                                                          dtype=np.float64)


def _gemm_flops(operands, result, rest: str) -> float:
  contracting = _CONTRACTING.search(rest)
  dims = [int(d.strip('"')) for d in contracting.group(1).split(",") if d] if contracting else []
  lhs = operands[0][1] if operands and operands[0] else ()
  k = np.prod([lhs[d] for d in dims], dtype=np.float64) if dims and lhs else 1.0
  return 2.0 * np.prod(result[1], dtype=np.float64) * k


def step_cost(compiled, hlo_text: str) -> Dict[str, float]:
  """What `compile_step` reads from `cost_analysis()`, for a deviceless GPU compile: XLA's
  HLO cost analysis (CPU client) of the optimised module plus the library calls."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  xla = {"flops": 0.0, "bytes accessed": 0.0}
  for module in compiled.runtime_executable().hlo_modules():
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    for key in xla:
      xla[key] += max(float(cost.get(key, 0.0)), 0.0)
  lib = library_calls(hlo_text)
  return {"flops": xla["flops"] + lib["flops"], "bytes accessed": xla["bytes accessed"] +
          lib["bytes"], "xla_flops": xla["flops"], "convolution_flops": lib["convolution_flops"],
          "library_calls": lib["calls"]}
