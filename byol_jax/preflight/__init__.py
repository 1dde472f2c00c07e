"""Pre-flight for a pod from any host: the real steps compiled for devices this host lacks.

`topology` (Cloud TPU slices as compile-only devices), `compile` (the steps
lowered and compiled for them, and what the compiler reports) and `roofline`
(chip peaks and the roofline estimate). `--job=compile` and
`launch/tpu_pod.py` use it. May import `evaluate`, `train`, `data`, `model`,
`views` and the shared utilities.
"""
