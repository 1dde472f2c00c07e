"""Defaults shared by every named config; each named config edits a copy.

Fields left at -1 are derived at start-up from the dataset size (see
`byol_jax.config_lib.finalize`), so an override of `epochs` or `batch_size`
moves every schedule with it.
"""

import ml_collections


def view_config(blur_prob: float, solarize_prob: float) -> ml_collections.ConfigDict:
  """One view's augmentation distribution (BYOL paper, Table 6)."""
  return ml_collections.ConfigDict(dict(
      crop_area=(0.08, 1.0),          # random resized crop: fraction of the image area
      crop_aspect=(3 / 4, 4 / 3),     # and aspect-ratio range (log-uniform)
      flip_prob=0.5,
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_prob=blur_prob,
      blur_sigma=(0.1, 2.0),          # kernel side is 10% of the image side
      solarize_prob=solarize_prob,
      solarize_threshold=0.5,
  ))


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4096                 # global, over all devices of all processes
  c.epochs = 1000.0
  c.steps = -1                        # derived from epochs unless set
  c.warmup_epochs = 10.0
  c.warmup_steps = -1                 # derived from warmup_epochs unless set
  c.base_tau = 0.996
  c.tau_schedule = "cosine"           # "constant" keeps tau = base_tau (0.0: no EMA, an ablation)
  c.compute_dtype = "float32"         # "bfloat16": bf16 compute, fp32 params and optimizer

  c.model = ml_collections.ConfigDict(dict(
      depth=50, width=1, stem="imagenet", norm="batch",   # norm: "batch" | "group_ws"
      zero_init_residual=False,
      base_channels=64,               # stem width; < 64 only for CPU demos and tests
      projector_hidden=4096, predictor_hidden=4096, projection_dim=256,
      # Speed option, off as in the paper: one BN batch for both views.
      merge_views_bn=False,
      use_predictor=True,             # False: the paper's collapsing ablation
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      base_lr=0.2, weight_decay=1.5e-6, momentum=0.9, eta=1e-3))

  c.data = ml_collections.ConfigDict(dict(
      source="tfds",                  # "tfds" | "folder" (directory or .zip) | "demo"
      name="imagenet2012",            # TFDS name (source="tfds")
      data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data_dir; may be gs://
      path=ml_collections.FieldReference(None, field_type=str),      # folder or zip (source="folder")
      train_split="train[10000:]",    # pretraining and linear-eval training
      val_split="train[:10000]",      # held out for hyper-parameter selection
      test_split="validation",        # reported numbers
      image_size=224,
      eval_crop_fraction=224 / 256,   # centre crop of the short side at evaluation; 1.0 = none
      num_classes=-1,                 # derived from the source unless set
      num_train_examples=-1,          # derived from the source unless set
      shuffle_buffer=10_000,          # streaming (TFDS) sources only
      prefetch_batches=2,
      # folder/zip sources: decode every file once at start-up to skip corrupt ones
      # ("all"), only check extensions ("none"), or "all" up to 200k files ("auto").
      verify_images="auto",
  ))
  c.augment = ml_collections.ConfigDict(dict(
      view1=view_config(blur_prob=1.0, solarize_prob=0.0),
      view2=view_config(blur_prob=0.1, solarize_prob=0.2),
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=5000,               # probe top-1/5, kNN and collapse monitor on held-out data
      knn_k=200, knn_temperature=0.1,
      max_examples=-1,                # cap on examples used by periodic eval (-1: all)
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log_every_steps = 50

  # Linear evaluation / fine-tuning of a pretrained encoder (job "linear_eval").
  c.linear_eval = ml_collections.ConfigDict(dict(
      pretrained_workdir=ml_collections.FieldReference(None, field_type=str),  # default: --workdir
      epochs=80.0, batch_size=1024, base_lr=0.2, momentum=0.9, nesterov=True,
      weight_decay=0.0, lr_grid=(), weight_decay_grid=(),  # grids: select on val_split
      fine_tune=False,                # train the encoder too (semi-supervised protocol)
      label_fraction=1.0,             # 0.01 / 0.1 for the 1% / 10% protocols
      encoder_lr_multiplier=1.0,
  ))
  c.export = ml_collections.ConfigDict(dict(include_projector=False))
  return c


def get_small_images_config() -> ml_collections.ConfigDict:
  """ResNet-18 with the small-dataset BYOL recipe (solo-learn's CIFAR hyper-parameters).

  Batch 256, LARS with lr 1.0 and eta 0.02, weight decay 1e-5, tau 0.99 -> 1;
  linear evaluation at batch 256, lr 0.1, 100 epochs. CIFAR, STL-10,
  Imagenette, custom folders and the demo start from here.
  """
  c = get_base_config()
  c.batch_size = 256
  c.base_tau = 0.99
  c.optimizer.base_lr = 1.0
  c.optimizer.weight_decay = 1e-5
  c.optimizer.eta = 0.02
  c.model.depth = 18
  c.linear_eval.epochs = 100.0
  c.linear_eval.batch_size = 256
  c.linear_eval.base_lr = 0.1
  return c
