"""TensorFlow as byol_jax imports it: without Keras (which stays importable) and without
accelerators. In a subprocess, since this pytest process may have imported TF already."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tensorflow_comes_without_keras_which_stays_importable():
  code = ("import importlib.util, sys\n"
          "from byol_jax.tf_import import import_tensorflow\n"
          "tf = import_tensorflow()\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tf_keras')))\n"
          "print(importlib.util.find_spec('keras') is not None)\n"
          "print(tf.config.get_visible_devices('GPU'), tf.data.Dataset.range(3).cardinality())\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[-3:] == ["[]", "True", "[] tf.Tensor(3, shape=(), dtype=int64)"]
