"""The linear-evaluation step computes in the pretraining's compute dtype."""

import jax
import numpy as np
import pytest

from byol_jax import config_lib
from byol_jax.model import networks
from byol_jax.train import linear_step, optim, parallel, train_step
from tests.test_main import tiny_config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_step_runs_in_the_config_s_compute_dtype(dtype):
  mesh = parallel.make_mesh()
  config = config_lib.prepare(tiny_config(compute_dtype=dtype), mesh)
  nets = networks.make_networks(config.model, config.data.num_classes)
  pretrained = jax.eval_shape(train_step.initial_state_fn(
      config, nets, optim.make_optimizer(config)))
  step = linear_step.make_linear_step(config, mesh, lr=0.1, weight_decay=0.0, steps=10)
  state = jax.eval_shape(step.init, pretrained.online_params, pretrained.online_state)
  size = config.data.image_size
  batch = {"image": jax.ShapeDtypeStruct((16, size, size, 3), np.float32),
           "label": jax.ShapeDtypeStruct((16,), np.int32)}
  for fn, args in ((step.update, (state, batch)), (step.predict, (state, batch["image"]))):
    convolutions = [line for line in fn.lower(*args).as_text().splitlines()
                    if "stablehlo.convolution" in line]
    assert convolutions and all(("bf16" in line) == (dtype == "bfloat16")
                                for line in convolutions)
