"""What each config field means for a resume: the one table the resume check reads.

A run resumed from a checkpoint must be the same run. For each job that resumes
(pretrain, linear_eval) every leaf of the config is one of:

* TRAJECTORY: a change alters what is trained, so a resume with another value
  is refused (unless --allow_changed_resume);
* ALLOWED: a change is accepted on resume, for the reason given (the
  learning-rate remedy, logging, evaluation, where the data is read from);
* NOT_APPLICABLE: the job does not read it.

A leaf missing from the table counts as TRAJECTORY at run time (refusing is the
safe mistake), and tests/test_config_fields.py fails until it is classified
here: add a row to FIELDS for each new config field.
"""

import json
from typing import Dict, Iterator, Tuple

TRAJECTORY = "refused"
ALLOWED = "allowed"
NOT_APPLICABLE = "n/a"
JOBS = ("pretrain", "linear_eval")
T, A, N = TRAJECTORY, ALLOWED, NOT_APPLICABLE

_VIEW = ("crop_area", "crop_aspect", "flip_prob", "color_jitter_prob", "brightness", "contrast",
         "saturation", "hue", "grayscale_prob", "blur_prob", "blur_sigma", "solarize_prob",
         "solarize_threshold")
_LR_REMEDY = "the learning-rate remedy a divergence advises (a new schedule from the resume on)"
_ARCH = "the network; a checkpoint of another architecture is refused apart from this table"
_FROM_CHECKPOINT = "linear_eval reads the model from the pretraining checkpoint"
_SAME_MATH = "same maths, other float rounding: a resumed run would not match bit for bit"
_EVAL = "evaluation only: read after or beside training, never by an update"
_LOG = "when to log or save, not what is trained"

# field: (pretrain, linear_eval, why)
FIELDS: Dict[str, Tuple[str, str, str]] = {
    "seed": (T, T, "every random draw: initialisation, data order, augmentation"),
    "batch_size": (T, N, "the gradient of each step and the data order"),
    "epochs": (T, N, "sets `steps` and so every schedule"),
    "steps": (T, N, "the length of every schedule (cosine lr and tau)"),
    "warmup_epochs": (A, N, _LR_REMEDY),
    "warmup_steps": (A, N, _LR_REMEDY),
    "base_tau": (T, N, "the target network's moving average"),
    "tau_schedule": (T, N, "the target network's moving average"),
    "compute_dtype": (T, T, "the precision of every step (linear_eval computes in it too)"),
    "log_every_steps": (A, A, _LOG),
    "import_path": (N, N, "read by --job=import_reference only"),
    "profile_steps": (A, N, "which steps a profiler traces, not what is trained"),
    **{f"model.{k}": (T, N, f"{_ARCH}; {_FROM_CHECKPOINT}") for k in (
        "depth", "width", "stem", "norm", "base_channels", "padding", "projector_hidden",
        "predictor_hidden", "projection_dim", "head_bias", "head_norm", "use_predictor")},
    "model.zero_init_residual": (T, N, f"the initialisation of the run; {_FROM_CHECKPOINT}"),
    "model.merge_views_bn": (T, N, f"BatchNorm statistics over both views; {_FROM_CHECKPOINT}"),
    "model.views_in_one_pass": (T, N, f"{_SAME_MATH}; {_FROM_CHECKPOINT}"),
    "model.remat": (T, N, f"{_SAME_MATH}; {_FROM_CHECKPOINT}"),
    "model.max_pool": (T, N, f"gradients differ at ties; {_FROM_CHECKPOINT}"),
    **{f"optimizer.{k}": (T, N, "the update rule") for k in (
        "weight_decay", "momentum", "eta", "predictor_lr_multiplier")},
    "optimizer.base_lr": (A, N, _LR_REMEDY),
    **{f"data.{k}": (T, T, "which examples are trained on, and in which order") for k in (
        "source", "name", "path", "train_split", "num_train_examples", "shuffle_buffer",
        "verify_images")},
    "data.image_size": (T, T, "the size of every training view"),
    "data.num_classes": (T, T, "the shape of the online probe and the classifier"),
    "data.data_dir": (A, A, "where the same TFDS data is read from (a copy may move)"),
    "data.prefetch_batches": (A, A, "how far the input runs ahead, not what it yields"),
    "data.val_split": (A, A, _EVAL),
    "data.test_split": (A, A, _EVAL),
    "data.eval_crop_fraction": (A, A, _EVAL),
    **{f"augment.{k}": (T, T, "the augmentation of every training view") for k in (
        "style", "crop", "color", "resize", "crop_on")},
    **{f"augment.{v}.{k}": (T, T, "the augmentation of every training view")
       for v in ("view1", "view2") for k in _VIEW},
    **{f"eval.{k}": (A, N, _EVAL) for k in (
        "every_steps", "batch_size", "knn_k", "knn_temperature", "knn_train_split",
        "knn_bank_dtype")},
    "checkpoint.every_steps": (A, A, _LOG),
    "checkpoint.keep": (A, N, "how many checkpoints to keep (linear_eval keeps 1)"),
    "linear_eval.pretrained_workdir": (N, T, "the encoder the classifier is trained on"),
    **{f"linear_eval.{k}": (N, T, "the classifier's training") for k in (
        "epochs", "batch_size", "momentum", "nesterov", "fine_tune", "label_fraction",
        "encoder_lr_multiplier")},
    # A learning rate and weight decay train in a folder of their own (lrLR_wdWD).
    **{f"linear_eval.{k}": (N, A, "names the run's folder: another value is another run")
       for k in ("base_lr", "weight_decay", "lr_grid", "weight_decay_grid")},
    "export.include_projector": (N, N, "read by --job=export only"),
    **{f"compile.{k}": (N, N, "read by --job=compile only") for k in (
        "topology", "num_slices", "steps", "save_hlo")},
    **{f"embed.{k}": (N, N, "read by --job=embed only") for k in (
        "split", "with_projection", "log_every", "output")},
}


def leaves(config_dict: dict, prefix: str = "") -> Iterator[Tuple[str, object]]:
  """(dotted name, value) of every leaf of a config's dict."""
  for key, value in config_dict.items():
    if isinstance(value, dict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def kind(job: str, field: str) -> str:
  """TRAJECTORY, ALLOWED or NOT_APPLICABLE; TRAJECTORY for a field not in FIELDS."""
  row = FIELDS.get(field)
  return row[JOBS.index(job)] if row else TRAJECTORY


def settings(job: str, config_dict: dict) -> dict:
  """The config's TRAJECTORY leaves for `job` as JSON values: what a resume must match."""
  plain = json.loads(json.dumps(config_dict))
  return {k: v for k, v in leaves(plain) if kind(job, k) == TRAJECTORY}
