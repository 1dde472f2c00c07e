"""How good a frozen encoder is: kNN, linear probe, collapse monitor.

`evaluation` (periodic evaluation during training) and `readout` (the frozen
read-out that `--job=compare` prints). May import `train`, `data`, `model` and
the shared utilities.
"""
