"""The reference's random-crop window as a pure function of four uniforms.

DeepMind's released BYOL (byol/utils/dataset.py, `_decode_and_random_crop`)
makes one draw per view: a target area uniform in `area_range` times the image
area, an aspect ratio w / h log-uniform in `aspect_range`, sides rounded (half
to even, as tf.round) and each clamped to the image, and offsets uniform over
the positions where the window fits. There are no retries and no centre
fallback: a window too wide or too tall is clamped, so its aspect ratio can
leave the range and the mean area drops (0.518 on a 375x500 image, not 0.54).

Written only with functions that numpy, jax.numpy and tensorflow all have
under the same names (pass the module as `xp`), so the TF host crop, a
device-side crop and the tests share these lines.
"""

import math

import numpy as np

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)


def crop_window_params(u_area, u_logratio, u_y, u_x, height, width,
                       area_range=AREA_RANGE, aspect_range=ASPECT_RANGE, xp=np):
  """The window (y, x, h, w) that the reference draws from four uniforms in [0, 1).

  Args:
    u_area, u_logratio, u_y, u_x: uniforms in [0, 1), floats of one dtype, any
      (broadcastable) shape: one window per element.
    height, width: the image size, as floats of that dtype.
    area_range: the window's area as a fraction of the image area.
    aspect_range: the window's w / h before clamping, drawn log-uniformly.
    xp: numpy, jax.numpy or tensorflow.

  Returns:
    (y, x, h, w), whole numbers in the uniforms' dtype; cast them to int.
  """
  area = (area_range[0] + (area_range[1] - area_range[0]) * u_area) * (height * width)
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  ratio = xp.exp(log_lo + (log_hi - log_lo) * u_logratio)
  # The reference has no lower clamp; a side rounds to 0 only on images under 5 pixels.
  w = xp.maximum(xp.minimum(xp.round(xp.sqrt(area * ratio)), width), 1.0)
  h = xp.maximum(xp.minimum(xp.round(xp.sqrt(area / ratio)), height), 1.0)
  # floor(u * (slack + 1)) is uniform over the slack + 1 offsets; u * n can round
  # up to n in float32, hence the minimum.
  y = xp.minimum(xp.floor(u_y * (height - h + 1.0)), height - h)
  x = xp.minimum(xp.floor(u_x * (width - w + 1.0)), width - w)
  return y, x, h, w
