r"""Does the demo's pretraining give the same numbers twice, on fewer threads, on another ISA?

Runs the first `--steps` steps of the demo recipe (`--config=demo`, one CPU
device, as `make demo`) several times, each in a fresh subprocess and workdir:

  again      the same command twice (run-to-run nondeterminism)
  1 thread   pinned to one core (`taskset -c 0`): XLA:CPU sizes its thread pool
             by the cores it may use
  AVX2       `--xla_cpu_max_isa=AVX2`: code generated for an older vector ISA
             (as on a CPU without AVX-512)

and prints, for each, a hash of the final TrainState (every array's bytes),
its loss rows, and whether it equals the first run bit for bit.

  python benchmarks/determinism.py                 # 4 runs of 100 steps, ~4 CPU-minutes
  python benchmarks/determinism.py --steps=200 --variants=again,1thread
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "first": ([], ""),
    "again": ([], ""),
    "1thread": (["taskset", "-c", "0"], ""),
    "AVX2": ([], "--xla_cpu_max_isa=AVX2"),
}

# Runs in the child: pretrain, then hash the checkpoint's arrays.
CHILD = r"""
import hashlib, json, os, sys
import jax, numpy as np
import orbax.checkpoint as ocp
from byol_jax import config_lib, jobs
from byol_jax.train import checkpoint
workdir, steps = sys.argv[1], int(sys.argv[2])
config = config_lib.load("demo")
config.steps, config.log_every_steps = steps, max(1, steps // 4)
config.eval.every_steps, config.checkpoint.every_steps = -1, 0
jobs.run("pretrain", config, workdir)
ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir))
items = ckpt.manager.restore(steps, args=ocp.args.Composite(
    online=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
ckpt.close()
digest = hashlib.sha256()
for leaf in jax.tree.leaves({"online": items["online"], "train": items["train"]}):
  digest.update(np.asarray(leaf).tobytes())
print("RESULT " + json.dumps({"hash": digest.hexdigest()[:16]}))
"""


def run(name: str, steps: int, root: str) -> dict:
  prefix, flags = VARIANTS[name]
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS=flags)
  workdir = os.path.join(root, name)
  out = subprocess.run([*prefix, sys.executable, "-c", CHILD, workdir, str(steps)], env=env,
                       cwd=REPO, capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode != 0 or not lines:
    raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "pretrain_metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if line.strip()]
  return {**json.loads(lines[-1][len("RESULT "):]), "losses": losses}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--variants", default="again,1thread,AVX2",
                 help=f"compared with a first run: any of {', '.join(list(VARIANTS)[1:])}")
  args = p.parse_args(argv)
  root = tempfile.mkdtemp(prefix="byol_determinism_")
  try:
    first = run("first", args.steps, root)
    print(f"{'run':<10}{'state hash':<18}{'same state':<12}losses (rows of {args.steps // 4 or 1} "
          "steps)")
    print(f"{'first':<10}{first['hash']:<18}{'':<12}{first['losses']}", flush=True)
    for name in args.variants.split(","):
      r = run(name, args.steps, root)
      same = "yes" if r["hash"] == first["hash"] else "NO"
      print(f"{name:<10}{r['hash']:<18}{same:<12}{r['losses']}", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
