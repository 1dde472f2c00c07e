"""The jobs `--job` selects; each module has `run(config, workdir, mesh) -> dict`.

Jobs that resume from their own checkpoints (RESUMING) also take
`allow_changed_resume`. A job holds its workdir for its whole run
(`workdir_lock`): a second run on it is refused. OFFLINE jobs compile for
other devices than this host's: they take no mesh, hold no workdir, and
`--workdir` is optional.
"""

import importlib

JOBS = {
    "pretrain": "BYOL pretraining (resumes from --workdir/checkpoints)",
    "linear_eval": "linear evaluation (or fine-tuning) of the pretrained encoder",
    "knn": "kNN accuracy of the pretrained encoder",
    "compare": "the pretrained encoder vs the same network at random init (kNN, linear, collapse)",
    "export": "the encoder as .npz and as a torchvision state dict",
    "embed": "the encoder's embeddings of one split of any source -> embeddings.npz",
    "import_reference": "DeepMind's released BYOL checkpoint (.pkl) -> a byol_jax checkpoint",
    "compile": "pre-flight for a TPU pod or GPU nodes from any host: compile the steps for "
               "--config.compile.topology, report memory and a roofline estimate",
}
RESUMING = ("pretrain", "linear_eval")
OFFLINE = ("compile",)


def run(job: str, config, workdir: str, mesh=None, *, allow_changed_resume: bool = False) -> dict:
  """Runs one job in-process (the entry point of `main` and of the tests).

  A multi-process job holds the workdir through process 0.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from byol_jax.train import parallel, workdir_lock
  module = importlib.import_module(f"byol_jax.jobs.{job}")
  if job in OFFLINE:
    return module.run(config, workdir)
  extra = {"allow_changed_resume": allow_changed_resume} if job in RESUMING else {}
  try:
    with workdir_lock.hold(workdir, job, enabled=jax.process_index() == 0):
      return module.run(config, workdir, mesh or parallel.make_mesh(), **extra)
  finally:
    datasets.clear_source_cache()
