"""Pre-flight for a pod from any host: the real steps compiled for devices this host lacks.

`topology` (Cloud TPU slices as compile-only devices), `gpu` (NVIDIA GPUs and
nodes as the CUDA plugin's compile-only devices), `compile` (the steps lowered
and compiled for them, and what the compiler reports), `gpu_cost` (FLOPs and
bytes of a deviceless GPU compile, which has no cost analysis) and `roofline`
(chip peaks and the roofline estimate). `--job=compile`, `launch/tpu_pod.py`
and `launch/slurm.py` use it. May import `evaluate`, `train`, `data`, `model`,
`views` and the shared utilities.
"""
