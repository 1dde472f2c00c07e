r"""BYOL ResNet-50 on ImageNet, the paper's main recipe (74.3% linear top-1 at 1000 epochs).

Batch 4096 over all devices, LARS, lr 0.2 x batch/256, weight decay 1.5e-6,
tau_base 0.996, 10 warm-up epochs, on all 1,281,167 training images with
floor(epochs x N / batch) steps, as DeepMind's byol/configs/byol.py. Shorter
schedules use its presets: `--config=resnet50_imagenet:300` (also 40 and 100).
Linear evaluation as its byol/configs/eval.py (see `linear_eval` in base.py).
"""

from byol_jax.errors import ConfigError
from byol_jax.configs import base

# epochs -> (base_lr, weight_decay, base_tau): byol/configs/byol.py's presets.
PRESETS = {
    40: (0.45, 1e-6, 0.97),
    100: (0.45, 1e-6, 0.99),
    300: (0.3, 1e-6, 0.99),
    1000: (0.2, 1.5e-6, 0.996),
}


def imagenet_config(epochs: int):
  if epochs not in PRESETS:
    raise ConfigError(f"No preset for {epochs} epochs; use one of {sorted(PRESETS)} "
                      "or set --config.epochs and the hyper-parameters yourself.")
  c = base.get_base_config()
  c.epochs = float(epochs)
  c.optimizer.base_lr, c.optimizer.weight_decay, c.base_tau = PRESETS[epochs]
  # The same math as two passes (BN per view), per platform: on TPU a quarter fewer HBM
  # bytes per step (experiments/tpu_scale.md); on CPU 1.36x slower; on NVIDIA GPUs see
  # experiments/gpu_scale.md.
  c.model.views_in_one_pass = "auto"
  # Periodic kNN on a fixed tenth of the training images (128,117): about 1% of training time
  # on the pods of experiments/eval_scale.md (an estimate); --job=knn reads all of them.
  c.eval.knn_train_split = "train[:10%]"
  return c


def get_config(epochs: str = "1000"):
  return imagenet_config(int(epochs))
