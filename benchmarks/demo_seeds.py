r"""The demo recipe over several seeds: does its gap to random init survive the seed?

For each seed it runs what `make demo` runs, as a person would (subprocesses of
`python -m byol_jax.main --config=demo`): pretraining with `--config.seed=N`,
then `--job=compare`, in a fresh temporary workdir. It prints one row per seed
and a summary (mean, min, max):

  kNN and linear-probe top-1 of BYOL and of random init, and the gaps;
  the collapse monitor (the training batches' projection spread) at the steps
  of `--spread_steps`, its minimum over the run, and the test projections'
  spread from `--job=compare`;
  the BYOL loss at the end;
  pretraining's wall and CPU seconds (user + sys of the subprocess), and the
  compare job's.

  python benchmarks/demo_seeds.py --seeds=0,1,2,3,4                    # ~5 x 5.5 min, idle
  python benchmarks/demo_seeds.py --seeds=0,1,2,3,4 \
      --json=experiments/demo_seeds.json                               # refresh the record
  python benchmarks/demo_seeds.py --seeds=0 --set=optimizer.base_lr=0.5  # a variant
  python benchmarks/demo_seeds.py --merge a.json b.json --json=c.json   # one table of several

`--parallel=2` runs two seeds at once: each row's CPU seconds are still its own
runs' (os.wait4), but the wall seconds are not a single run's (each has half the
cores). Time the recipe on idle cores, one seed at a time.

`--json=experiments/demo_seeds.json` rewrites the record that the README's demo
figures and `tests/test_demo_recipe.py` (BYOL_SLOW=1) read.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(REPO, "experiments", "demo_seeds.json")
GAPS = ("knn_gap", "linear_gap")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
  p.add_argument("--config", default="demo", help="config name or file (default: the demo)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config override for pretraining (repeatable), e.g. optimizer.base_lr=0.5")
  p.add_argument("--spread_steps", default="1000,2000",
                 help="steps at which to report the training projection spread (and the last)")
  p.add_argument("--root", default=None, help="keep the workdirs under this folder "
                 "(default: a temporary folder, removed at the end)")
  p.add_argument("--json", default=None, help="also write the rows and summary here")
  p.add_argument("--parallel", type=int, default=1, help="seeds run at once")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="no runs: one table of these --json records (same config and overrides)")
  return p.parse_args(argv)


def _timed(cmd, log_path: str) -> dict:
  """Runs `cmd` to completion; its wall and CPU (user + sys) seconds. Raises on failure."""
  start = time.perf_counter()
  with open(log_path, "a") as log:
    child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    # wait4: this child's own rusage, right even while other seeds run beside it.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  if child.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} exited {child.returncode}; see {log_path}")
  return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def read_metrics(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def spread_at(rows: list, steps) -> dict:
  """The training projection spread at the logged steps nearest each of `steps`, the last
  logged one and the minimum over the run."""
  logged = [r for r in rows if "projection_std" in r]
  out = {}
  for step in steps:
    nearest = min(logged, key=lambda r: abs(r["step"] - step))
    out[str(nearest["step"])] = nearest["projection_std"]
  out[str(logged[-1]["step"])] = logged[-1]["projection_std"]
  low = min(logged, key=lambda r: r["projection_std"])
  return {"at": out, "min": low["projection_std"], "min_step": low["step"]}


def run_seed(seed: int, args, root: str) -> dict:
  """Pretrain + compare for one seed; the row of the table."""
  workdir = os.path.join(root, f"seed{seed}")
  log = workdir + ".log"
  base = [sys.executable, "-m", "byol_jax.main", f"--config={args.config}",
          f"--workdir={workdir}"]
  overrides = [f"--config.{kv}" for kv in args.set]
  pretrain = _timed(base + [f"--config.seed={seed}", *overrides], log)
  compare = _timed(base + ["--job=compare"], log)
  with open(os.path.join(workdir, "compare_results.json")) as f:
    report = json.load(f)
  byol, random = report["results"]["byol"], report["results"]["random"]
  rows = read_metrics(os.path.join(workdir, "pretrain_metrics.jsonl"))
  steps = [int(s) for s in args.spread_steps.split(",") if s]
  with open(log) as f:
    warnings = [line.strip() for line in f if "collapse monitor: at step" in line]
  return {
      "seed": seed,
      "knn_byol": byol["knn_top1"], "knn_random": random["knn_top1"],
      "linear_byol": byol["probe_top1"], "linear_random": random["probe_top1"],
      "knn_gap": byol["knn_top1"] - random["knn_top1"],
      "linear_gap": byol["probe_top1"] - random["probe_top1"],
      "test_spread": byol["projection_spread"],
      "train_spread": spread_at(rows, steps),
      "byol_loss_end": [r for r in rows if "byol_loss" in r][-1]["byol_loss"],
      "collapse_warnings": warnings,
      "pretrain": pretrain, "compare": compare,
  }


def summary(rows: list) -> dict:
  keys = ("knn_byol", "knn_random", "linear_byol", "linear_random", *GAPS, "test_spread")
  out = {k: {"mean": statistics.mean(r[k] for r in rows), "min": min(r[k] for r in rows),
             "max": max(r[k] for r in rows)} for k in keys}
  out["train_spread_min"] = min(r["train_spread"]["min"] for r in rows)
  for phase in ("pretrain", "compare"):
    for unit in ("wall_s", "cpu_s"):
      values = [r[phase][unit] for r in rows]
      out[f"{phase}_{unit}"] = {"mean": statistics.mean(values), "max": max(values)}
  return out


HEADER = (f"{'seed':>4} {'kNN BYOL/rand':>14} {'lin BYOL/rand':>14} {'gap kNN/lin':>13} "
          f"{'spread (train, at steps)':>34} {'min@step':>11} {'test':>6} {'loss':>6} "
          f"{'pretrain wall/CPU s':>20} {'compare CPU s':>14}")


def format_row(r: dict) -> str:
  pct = lambda x: f"{100 * x:.1f}"
  at = " ".join(f"{s}:{v:.2f}" for s, v in r["train_spread"]["at"].items())
  low = f"{r['train_spread']['min']:.2f}@{r['train_spread']['min_step']}"
  return (f"{r['seed']:>4} {pct(r['knn_byol']) + '/' + pct(r['knn_random']):>14} "
          f"{pct(r['linear_byol']) + '/' + pct(r['linear_random']):>14} "
          f"{f'{100 * r[GAPS[0]]:+.1f}/{100 * r[GAPS[1]]:+.1f}':>13} {at:>34} {low:>11} "
          f"{r['test_spread']:>6.2f} {r['byol_loss_end']:>6.3f} "
          f"{'{:.0f}/{:.0f}'.format(r['pretrain']['wall_s'], r['pretrain']['cpu_s']):>20} "
          f"{r['compare']['cpu_s']:>14.0f}")


def format_summary(s: dict) -> str:
  def span(key):
    v = s[key]
    return f"{100 * v['mean']:.1f} ({100 * v['min']:.1f} to {100 * v['max']:.1f})"
  return "\n".join([
      f"kNN    BYOL {span('knn_byol')}  random {span('knn_random')}  gap {span('knn_gap')}",
      f"linear BYOL {span('linear_byol')}  random {span('linear_random')}  "
      f"gap {span('linear_gap')}",
      f"lowest training projection spread {s['train_spread_min']:.2f}; test spread "
      f"{s['test_spread']['min']:.2f} to {s['test_spread']['max']:.2f}",
      f"pretrain wall {s['pretrain_wall_s']['mean']:.0f} s (max {s['pretrain_wall_s']['max']:.0f})"
      f", CPU {s['pretrain_cpu_s']['mean']:.0f} s (max {s['pretrain_cpu_s']['max']:.0f}); "
      f"compare CPU {s['compare_cpu_s']['mean']:.0f} s",
  ])


def merged(paths) -> dict:
  """One record of the rows of several (same config and overrides), sorted by seed."""
  records = []
  for path in paths:
    with open(path) as f:
      records.append(json.load(f))
  recipes = {(r["config"], tuple(r["overrides"])) for r in records}
  if len(recipes) > 1:
    raise SystemExit(f"--merge needs records of one recipe, got {sorted(recipes)}")
  rows = sorted((row for r in records for row in r["rows"]), key=lambda row: row["seed"])
  return {**records[0], "started": min(r["started"] for r in records),
          "finished": max(r["finished"] for r in records), "merged_from": list(paths),
          "parallel": max(r.get("parallel", 1) for r in records), "rows": rows}


def run_seeds(args) -> dict:
  seeds = [int(s) for s in args.seeds.split(",")]
  root = args.root or tempfile.mkdtemp(prefix="demo_seeds_")
  os.makedirs(root, exist_ok=True)
  started = datetime.datetime.now().isoformat(timespec="seconds")
  print(f"demo recipe {args.config} {' '.join(args.set)} over seeds {seeds}; "
        f"load average {os.getloadavg()[0]:.1f}; logs under {root}", flush=True)
  print(HEADER, flush=True)

  def one(seed):
    row = run_seed(seed, args, root)
    print(format_row(row), flush=True)
    return row

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
      rows = list(pool.map(one, seeds))
  finally:
    if args.root is None:
      shutil.rmtree(root, ignore_errors=True)
  return {"config": args.config, "overrides": args.set, "started": started,
          "finished": datetime.datetime.now().isoformat(timespec="seconds"),
          "load_average_end": os.getloadavg()[0], "machine": os.uname().nodename,
          "cpus": os.cpu_count(), "parallel": args.parallel, "rows": rows}


def main(argv=None) -> dict:
  args = parse_args(argv)
  report = merged(args.merge) if args.merge else run_seeds(args)
  report["summary"] = summary(report["rows"])
  if args.merge:
    print(HEADER + "\n" + "\n".join(format_row(r) for r in report["rows"]), flush=True)
  print(format_summary(report["summary"]), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
