"""The demo recipe still gives the figures the README quotes (slow: runs only with BYOL_SLOW=1).

It runs what `make demo` runs for one seed (`benchmarks/demo_seeds.py`:
pretraining, then `--job=compare`, as subprocesses, on the recorded config and
overrides) and checks that its figures lie within the range recorded over five
seeds in experiments/demo_seeds.json, and that the collapse monitor never fell.
About 10 CPU-minutes:

  BYOL_SLOW=1 python -m pytest tests/test_demo_recipe.py -q        # BYOL_SLOW_SEED=N: seed N

When the code changes what the demo learns, refresh the record (and the README's
figures, which quote it) with
`python benchmarks/demo_seeds.py --seeds=0,1,2,3,4 --json=experiments/demo_seeds.json`.
"""

import json
import os

import pytest

from tests.test_benchmarks import _env, _load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(REPO, "experiments", "demo_seeds.json")
CHECKED = ("knn_byol", "linear_byol", "knn_gap", "linear_gap")

pytestmark = pytest.mark.skipif(os.environ.get("BYOL_SLOW") != "1",
                                reason="slow (~10 CPU-minutes): set BYOL_SLOW=1")


def test_one_seed_of_the_demo_lies_within_the_recorded_range(tmp_path, monkeypatch):
  # The demo's subprocesses see one CPU device, as under `make demo`, not conftest's 8: spread
  # over 8 the same recipe sums in another order; so run, it failed the range check (and took 2x).
  monkeypatch.setenv("XLA_FLAGS", _env()["XLA_FLAGS"])
  with open(RECORD) as f:
    record = json.load(f)
  demo_seeds = _load("demo_seeds")
  seed = int(os.environ.get("BYOL_SLOW_SEED", "0"))
  args = demo_seeds.parse_args([f"--seeds={seed}", f"--config={record['config']}",
                                *(f"--set={kv}" for kv in record["overrides"])])
  row = demo_seeds.run_seed(seed, args, str(tmp_path))
  print(demo_seeds.HEADER + "\n" + demo_seeds.format_row(row))
  for key in CHECKED:
    low, high = record["summary"][key]["min"], record["summary"][key]["max"]
    assert low <= row[key] <= high, (f"{key} {100 * row[key]:.1f} is outside the recorded "
                                     f"{100 * low:.1f} to {100 * high:.1f}: refresh the record")
  assert row["collapse_warnings"] == [] and row["train_spread"]["min"] >= 0.6
