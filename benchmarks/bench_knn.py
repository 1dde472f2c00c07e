r"""kNN time and peak host memory: the sharded kNN (`byol_jax.evaluate.knn`) against the
single-device one byol_jax ran before (`dense_knn_accuracy` below: the whole bank on one
device, one `top_k` per query chunk, votes through an N x classes one-hot).

Random unit features (seeded), 1000 classes, k=200, T=0.1, as ImageNet's kNN would
see them; each run in a fresh process so its peak RSS is its own:

  python benchmarks/bench_knn.py --rows=50000,200000,400000 --queries=10000 --dim=2048 \
      --impl=sharded,dense [--devices=8] [--bank_dtype=bfloat16] [--json=out.json]

prints one line per (impl, rows): seconds for the kNN (features already on the
device), the process's peak RSS, and top-1 (the two impls must agree).
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_knn_accuracy(train, train_labels, test, test_labels, *, num_classes: int, k: int = 200,
                       temperature: float = 0.1, chunk: int = 1024) -> dict:
  """The pre-sharding kNN: the whole bank on one device, ties to the lower row."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol_jax.model import objectives  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnames="k")
  def votes(test, train, onehot, temperature, k):
    sims = objectives.l2_normalize(test) @ objectives.l2_normalize(train).T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    return jnp.einsum("tk,tkc->tc", jnp.exp(top_sims / temperature), onehot[top_idx])

  k = min(k, len(train))
  onehot = jax.nn.one_hot(train_labels, num_classes)
  bank = jnp.asarray(train, jnp.float32)
  hits = {"top1": 0, "top5": 0}
  for start in range(0, len(test), chunk):
    v = votes(jnp.asarray(test[start:start + chunk], jnp.float32), bank, onehot, temperature, k)
    counts = objectives.topk_correct(v, jnp.asarray(test_labels[start:start + chunk]))
    hits = {key: hits[key] + int(counts[key]) for key in hits}
  return {key: value / max(len(test), 1) for key, value in hits.items()}


def one(impl: str, rows: int, queries: int, dim: int, bank_dtype: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluate import knn  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((1000, dim), dtype=np.float32)
  train_labels = rng.integers(0, 1000, rows).astype(np.int32)
  test_labels = rng.integers(0, 1000, queries).astype(np.int32)

  def around_centres(labels):  # float32 throughout, in blocks: no float64 or gathered copy
    x = rng.standard_normal((len(labels), dim), dtype=np.float32)
    for start in range(0, len(labels), 50_000):
      x[start:start + 50_000] += centres[labels[start:start + 50_000]]
    return x

  train, test = around_centres(train_labels), around_centres(test_labels)
  mesh = parallel.make_mesh()
  if impl == "sharded":
    train_f = knn.from_arrays(train, train_labels, mesh)
    test_f = knn.from_arrays(test, test_labels, mesh)
    del train, test
    jax.block_until_ready((dict(train_f), dict(test_f)))
    start = time.perf_counter()
    result = knn.knn_accuracy(train_f, test_f, mesh, num_classes=1000, k=200,
                              bank_dtype=bank_dtype)
  else:
    start = time.perf_counter()
    result = dense_knn_accuracy(train, train_labels, test, test_labels, num_classes=1000)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"impl": impl, "rows": rows, "queries": queries, "dim": dim, "devices": jax.device_count(),
          "bank_dtype": bank_dtype if impl == "sharded" else "float32", "seconds": seconds,
          "peak_rss_bytes": peak, **result}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="50000,200000,400000")
  parser.add_argument("--queries", type=int, default=10000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--impl", default="sharded,dense")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--bank_dtype", default="float32")
  parser.add_argument("--json", default="")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # impl:rows, in a child
  args = parser.parse_args()
  if args.one:
    impl, rows = args.one.split(":")
    print(json.dumps(one(impl, int(rows), args.queries, args.dim, args.bank_dtype)))
    return
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
  results = []
  for rows in [int(r) for r in args.rows.split(",")]:
    for impl in args.impl.split(","):
      out = subprocess.run([sys.executable, __file__, f"--one={impl}:{rows}",
                            f"--queries={args.queries}", f"--dim={args.dim}",
                            f"--bank_dtype={args.bank_dtype}"],
                           env=env, capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      results.append(r)
      print(f"{r['impl']:<8} {r['rows']:>8} rows x {r['queries']} queries, {r['dim']}-d, "
            f"{r['devices']} device(s), bank {r['bank_dtype']}: {r['seconds']:7.1f} s, "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB, top-1 {r['top1']:.4f} "
            f"top-5 {r['top5']:.4f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
