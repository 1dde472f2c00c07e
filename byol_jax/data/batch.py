"""The batch contract: what the input pipelines yield and the steps read.

Every batch is a dict of this process's numpy rows (b = B/P of a global batch
of B), typed below. A pretraining batch comes in one of two variants, chosen
once per run by `pretrain_variant` (from `config.augment.crop_on` and the
source kind, `datasets.crop_on_device`):

* `HOST_VIEWS` (encoded files, tf.data): the host decoded, cropped, resized
  and flipped both views;
* `DEVICE_CROP` (equal-sized images in memory, `sources.ArraySource`): the
  host only gathered the rows, and the update step cuts both views
  (`raw_views`, with `views.device_crop`) from the raw `image` and one
  `crop_seed` per example and view.

Linear-training and evaluation batches have one variant each: their views
are cut before they are yielded, on the host or by `device_crop` on the
default device, so their consumers never see the difference.
"""

from typing import NamedTuple, Optional, Tuple, TypedDict, Union

import numpy as np

from byol_jax.configs import base
from byol_jax.data import datasets, sources
from byol_jax.views import device_crop, host_augment


class HostViewsBatch(TypedDict):
  view1: np.ndarray  # [b, S, S, 3] in host_augment.VIEW_DTYPES[resize], [0, 1] (uint8: [0, 255])
  view2: np.ndarray
  label: np.ndarray  # int32 [b], -1 when unlabelled


class DeviceCropBatch(TypedDict):
  image: np.ndarray      # uint8 [b, H, W, 3], as stored
  crop_seed: np.ndarray  # uint32 [b, 2, 2]: a threefry key per example and view
  label: np.ndarray


PretrainBatch = Union[HostViewsBatch, DeviceCropBatch]


class LinearBatch(TypedDict):
  image: np.ndarray  # [b, S, S, 3] like a host view: view1's random crop and flip
  label: np.ndarray


class EvalBatch(TypedDict):
  image: np.ndarray  # [b, S, S, 3] like a host view: the centre crop
  label: np.ndarray  # -1 on padding rows
  mask: np.ndarray   # bool [b]: False on the rows that pad the split's last batch


class Variant(NamedTuple):
  name: str
  keys: Tuple[str, ...]  # what it holds besides `label`


HOST_VIEWS = Variant("host_views", ("view1", "view2"))
DEVICE_CROP = Variant("device_crop", ("image", "crop_seed"))


def pretrain_variant(config, tensorflow: Optional[bool] = None) -> Variant:
  """The one choice of a run's pretraining batches. `tensorflow`: whether it is installed
  where the run happens (None: here)."""
  return DEVICE_CROP if datasets.crop_on_device(config, tensorflow) else HOST_VIEWS


def variant_of(batch) -> Variant:
  """The variant a pretraining batch is, by its keys."""
  for variant in (HOST_VIEWS, DEVICE_CROP):
    if set(variant.keys) <= set(batch):
      return variant
  raise ValueError(f"A pretraining batch holds {sorted(batch)}: it needs {HOST_VIEWS.keys} "
                   f"or {DEVICE_CROP.keys} (and 'label').")


def raw_views(config, batch: PretrainBatch):
  """The two views before the colour ops: the host's, or those cut here (inside the step)."""
  if variant_of(batch) is DEVICE_CROP:
    return device_crop.pretrain_views(config, batch["image"], batch["crop_seed"])
  return batch["view1"], batch["view2"]


def shapes(config, kind: str, batch_size: int, source_side: int = 0) -> dict:
  """{key: (shape, dtype)} of the global batches of `kind` ("pretrain", "linear" or
  "eval"), as the steps that take them see them; for compiling those steps without
  reading data. The pretraining variant is the one the run would choose where it happens
  (with TensorFlow, as requirements.txt installs it); `DEVICE_CROP` needs the side of the
  square in-memory images, `source_side`."""
  size = int(config.data.image_size)
  resize = base.resolve_augment(config.augment)["resize"]
  view = ((batch_size, size, size, 3), host_augment.VIEW_DTYPES[resize])
  label = ((batch_size,), "int32")
  if kind == "eval":
    return {"image": view, "label": label, "mask": ((batch_size,), "bool")}
  if kind == "linear":
    return {"image": view, "label": label}
  if pretrain_variant(config, tensorflow=True) is HOST_VIEWS:
    return {"view1": view, "view2": view, "label": label}
  if source_side <= 0:
    raise sources.DataSourceError(
        f"The crop runs on the device (augment.crop_on={config.augment.crop_on!r}), which needs "
        "one-size images in memory; the images of this data source vary in size. Set "
        "--config.augment.crop_on=host.")
  return {"image": ((batch_size, source_side, source_side, 3), "uint8"),
          "crop_seed": ((batch_size, 2, 2), "uint32"), "label": label}
