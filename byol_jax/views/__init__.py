"""The two augmented views of an image, as the reference draws them.

`crop_windows` (one crop draw, shared), `host_augment` (decode, crop, resize
and flip inside tf.data), `device_crop` (the same crop on in-memory images,
inside the step) and `device_augment` (the colour ops, blur and solarize,
inside the step). May import `configs` and the shared utilities.
"""
