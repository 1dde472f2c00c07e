"""Where images and labels come from, and the order they are read in.

`sources` (the source types and split strings), one module per kind
(`folder_source`, `tfds_source`, `array_source`), `datasets` (which kind a
config asks for), `stream_index` (which example sits at each stream position),
`input_pipeline` (tf.data for encoded files) and `array_pipeline` (in-memory
arrays), and `batch`, the contract between them and the steps. May import
`views`, `configs` and the shared utilities.

From a source to the step (`batch.pretrain_variant` chooses the row, once per run):

  source (datasets.load_source)   pipeline                        keys            step
  encoded files: folder, zip,     input_pipeline (tf.data: the    view1, view2,   train_step: colour ops
  demo, TFDS (crop_on=host, or    host decodes, crops, resizes,   label           (device_augment) on the
  auto with TensorFlow)           flips)                          (HOST_VIEWS)    views as they come
  in memory (ArraySource): npz,   array_pipeline (the host        image,          train_step: batch.raw_views
  or files decoded at start-up    gathers rows and derives the    crop_seed,      cuts both views
  (crop_on=device, or auto        crop seeds)                     label           (device_crop), then the
  without TensorFlow)                                             (DEVICE_CROP)   colour ops

Linear-training and evaluation batches (`image`, `label`; evaluation also
`mask`) come cut by either pipeline, so `linear_step` and the evaluation
forward never see which one ran.
"""
