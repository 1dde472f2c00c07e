"""Defaults shared by every named config; each named config edits a copy.

Fields left at -1 are derived at start-up from the dataset size (see
`byol_jax.config_lib.finalize`), so an override of `epochs` or `batch_size`
moves every schedule with it.
"""

import ml_collections

from byol_jax.errors import ConfigError


def view_config(blur_prob: float, solarize_prob: float) -> ml_collections.ConfigDict:
  """One view's augmentation distribution (BYOL paper, Table 6)."""
  return ml_collections.ConfigDict(dict(
      crop_area=(0.08, 1.0),          # random resized crop: fraction of the image area
      crop_aspect=(3 / 4, 4 / 3),     # and aspect-ratio range (log-uniform)
      flip_prob=0.5,
      color_jitter_prob=0.8,
      # Strengths s. tf_image colour: brightness adds U[-s, s], contrast and saturation
      # scale by U[1 - s, 1 + s]; torchvision: all three scale by U[max(0, 1 - s), 1 + s].
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,                        # both: the hue turns by U[-s, s] of a full turn
      grayscale_prob=0.2,
      blur_prob=blur_prob,
      blur_sigma=(0.1, 2.0),          # kernel 2 * (side // 20) + 1 taps, as the reference
      solarize_prob=solarize_prob,
      solarize_threshold=0.5,
  ))


# What `augment.style` sets. A crop / color / resize field of `config.augment`
# left at None follows the style; one set explicitly wins (an ablation).
AUGMENT_STYLES = {
    # DeepMind's released BYOL code: one-draw crop window (byol_jax/views/crop_windows.py),
    # tf.image colour ops with a zero-padded blur, bicubic resize on float.
    "reference": dict(crop="reference", color="tf_image", resize="bicubic"),
    # torchvision / SimCLR: Inception crop (10 tries, centre fallback), torchvision's
    # ColorJitter semantics with a reflect-padded blur, bilinear resize to uint8.
    "torchvision": dict(crop="inception", color="torchvision", resize="bilinear"),
}


def resolve_augment(augment) -> dict:
  """`{crop, color, resize}` of a `config.augment` block, checked (ConfigError)."""
  if augment.style not in AUGMENT_STYLES:
    raise ConfigError(f"augment.style must be one of {', '.join(map(repr, AUGMENT_STYLES))}, "
                      f"got {augment.style!r}.")
  resolved = dict(AUGMENT_STYLES[augment.style])
  for field in resolved:
    value = augment.get(field)
    if value is None:
      continue
    choices = sorted({style[field] for style in AUGMENT_STYLES.values()})
    if value not in choices:
      raise ConfigError(f"augment.{field} must be one of {', '.join(map(repr, choices))} or "
                        f"None (follow augment.style), got {value!r}.")
    resolved[field] = value
  return resolved


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
  # ("float64", with jax_enable_x64: params and everything else in float64, for parity checks
  # only; `--config` refuses it)

  c.model = ml_collections.ConfigDict(dict(
      depth=50, width=1, stem="imagenet", norm="batch",   # norm: "batch" | "group_ws"
      # True: each block's last BN scale starts at 0 (Goyal et al.), as the released
      # code does; the paper's numbers are without it (byol/README.md), hence off.
      zero_init_residual=False,
      base_channels=64,               # stem width; < 64 only for CPU demos and tests
      # "haiku_same": Haiku's asymmetric "SAME" padding at stride 2, as DeepMind's
      # released BYOL weights need (--job=import_reference); exports exactly too.
      padding="torchvision",
      projector_hidden=4096, predictor_hidden=4096, projection_dim=256,
      head_bias=False,                # output-layer bias of the heads: none in the released code
      head_norm=True,                 # BatchNorm in the heads; False: the "needs batch stats?" ablation
      # Speed option, off as in the paper: one BN batch for both views.
      merge_views_bn=False,
      # Layout option: both views through each network in one pass of 2x the batch, BN
      # statistics still per view (the same math); on TPU, batches of 128 per chip fill
      # the 128-wide tiles that 64 would pad (experiments/tpu_scale.md). True, False, or
      # "auto": chosen per platform when the step is lowered (train/train_step.py).
      views_in_one_pass=ml_collections.FieldReference(False, field_type=object),
      # Memory option: recompute each residual block's activations in the backward pass
      # instead of holding them (same math, ~1/3 more FLOPs).
      remat=False,
      # The stem max-pool's implementation (same values; gradients differ only at exact
      # ties): "auto" = nine slices on CPU (faster there), reduce_window elsewhere (TPU).
      max_pool="auto",
      use_predictor=True,             # False: the paper's collapsing ablation
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      base_lr=0.2, weight_decay=1.5e-6, momentum=0.9, eta=1e-3,
      predictor_lr_multiplier=1.0,    # the predictor's lr / the rest's (paper: 1)
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="tfds",                  # "tfds" | "folder" (directory or .zip) | "npz" | "demo"
      name="imagenet2012",            # TFDS name (source="tfds")
      data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data_dir; may be gs://
      path=ml_collections.FieldReference(None, field_type=str),      # folder, zip or .npz file
      # Pretraining and linear-eval training: all of train, as the reference. For the
      # linear-eval grid (selects on val_split), train on "train[10000:]" instead.
      train_split="train",
      val_split="train[:10000]",      # the reference's hyper-parameter selection split
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
      style="reference",              # sets crop, color, resize: see AUGMENT_STYLES
      crop=ml_collections.FieldReference(None, field_type=str),    # None: follow style
      color=ml_collections.FieldReference(None, field_type=str),   # None: follow style
      resize=ml_collections.FieldReference(None, field_type=str),  # None: follow style
      # Where the random resized crop + flip run: "host" (tf.data), "device" (in the step, on
      # one-size images decoded into memory), "auto": device for npz or without TensorFlow.
      crop_on="auto",
      view1=view_config(blur_prob=1.0, solarize_prob=0.0),
      view2=view_config(blur_prob=0.1, solarize_prob=0.2),
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=5000,               # probe top-1/5, kNN and collapse monitor on held-out data
      batch_size=1024,                # global batch of evaluation forwards (kNN, probe)
      knn_k=200, knn_temperature=0.1,
      # Periodic evaluation's kNN bank (None: data.train_split). A slice such as
      # "train[:10%]" is a fixed subset (sources.py); --job=knn always reads all of
      # data.train_split.
      knn_train_split=ml_collections.FieldReference(None, field_type=str),
      knn_bank_dtype="float32",       # "bfloat16": half the bank's bytes, float32 accumulation
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log_every_steps = 50
  # (A, B): a jax.profiler trace of pretraining steps A..B (1-based) under workdir/tensorboard,
  # for TensorBoard's profile tab; () traces nothing.
  c.profile_steps = ()

  # Linear evaluation / fine-tuning of a pretrained encoder (job "linear_eval").
  c.linear_eval = ml_collections.ConfigDict(dict(
      pretrained_workdir=ml_collections.FieldReference(None, field_type=str),  # default: --workdir
      # The reference's byol/configs/eval.py: SGD with Nesterov momentum, lr 0.2 x
      # batch/256 cosine-decayed without warm-up, no weight decay, at the batch size
      # of the pretraining run (its --batch_size flag), crop + flip only.
      epochs=80.0, batch_size=4096, base_lr=0.2, momentum=0.9, nesterov=True,
      weight_decay=0.0, lr_grid=(), weight_decay_grid=(),  # grids: select on val_split
      fine_tune=False,                # train the encoder too (semi-supervised protocol)
      label_fraction=1.0,             # 0.01 / 0.1 for the 1% / 10% protocols
      encoder_lr_multiplier=1.0,
  ))
  c.export = ml_collections.ConfigDict(dict(include_projector=False))
  # --job=compile: this config's steps compiled for a Cloud TPU slice or GPU nodes, on any host.
  c.compile = ml_collections.ConfigDict(dict(
      # "v4-128", "v5p-128", "v5litepod-256", "v6e-64", "v3-8" or "v4:4x4x4" (GEN:SHAPE); or
      # NVIDIA GPUs: "h100", "h100x8" (a node of 8), "h100:2x8"; a100-40gb, a100-80gb, h200
      topology=ml_collections.FieldReference(None, field_type=str),
      num_slices=1,                   # > 1: that many slices joined over the data-centre network
      steps=("pretrain", "eval", "linear_eval"),
      save_hlo=False,                 # also write each step's optimised HLO (benchmarks/hlo_bytes.py)
  ))
  # --job=embed: the trained encoder's embeddings of one split of config.data's source.
  c.embed = ml_collections.ConfigDict(dict(
      split=ml_collections.FieldReference(None, field_type=str),   # None: data.test_split
      with_projection=False,          # also write the projector's output
      log_every=10_000,               # a progress line per this many images
      output=ml_collections.FieldReference(None, field_type=str),  # None: workdir/embeddings.npz
  ))
  # DeepMind's released checkpoint (.pkl) that --job=import_reference reads.
  c.import_path = ml_collections.FieldReference(None, field_type=str)
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
