"""What `--job=compare` draws: nearest neighbours and a 2-D map of the test embeddings.

Both show the frozen `embedding` features that kNN and the probe read, for
each encoder of the comparison side by side (BYOL, random init):

* `neighbours.png`: test images (the first of each of up to 8 classes), each
  with its 5 nearest training images by cosine similarity (kNN's measure,
  `knn.nearest` over the sharded bank); a red frame marks a neighbour of
  another class.
* `embedding_map.png`: t-SNE (scikit-learn) of the test embeddings, coloured
  by class. t-SNE keeps neighbourhoods, not distances: read clusters, not gaps.

matplotlib and scikit-learn are imported here only, when a picture is drawn.
"""

from typing import Dict, Optional, Sequence

import numpy as np

from byol_jax import fileio

NUM_QUERIES = 8
NUM_NEIGHBOURS = 5
MAP_MAX_POINTS = 2000   # t-SNE's cost grows with n^2 at this size: a fixed subset beyond it
DPI = 100
NEIGHBOURS_INCHES = (13.0, 9.0)
MAP_INCHES = (12.0, 5.5)
# Pixel sizes of the PNGs (the figure size at DPI; nothing trims them).
NEIGHBOURS_PX = tuple(int(x * DPI) for x in NEIGHBOURS_INCHES)
MAP_PX = tuple(int(x * DPI) for x in MAP_INCHES)


def pick_queries(labels: np.ndarray, count: int = NUM_QUERIES) -> np.ndarray:
  """The first example of each class (lowest classes first), then the first others,
  up to `count`: a varied, reproducible set."""
  firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels[labels >= 0])]
  rest = [i for i in range(len(labels)) if i not in set(firsts)]
  return np.asarray((firsts + rest)[:count], np.int64)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _class_name(label: int, class_names: Sequence[str]) -> str:
  if label < 0:
    return "?"
  return class_names[label] if label < len(class_names) else str(label)


def _save(fig, path: str) -> str:
  with fileio.atomic_local_path(path) as tmp:
    fig.savefig(tmp, dpi=DPI, format="png")
  return path


def draw_neighbours(path: str, queries: Dict, encoders: Dict[str, Dict],
                    class_names: Sequence[str]) -> str:
  """`queries`: {"images": [uint8 HxWx3], "labels": [Q]}; `encoders`: name ->
  {"images": [[uint8 HxWx3] x k] x Q, "labels": int [Q, k]} of its neighbours."""
  plt = _pyplot()
  names = list(encoders)
  count = len(queries["images"])
  cols = 1 + len(names) * (NUM_NEIGHBOURS + 1)
  fig, axes = plt.subplots(count, cols, figsize=NEIGHBOURS_INCHES, squeeze=False,
                           gridspec_kw=dict(wspace=0.08, hspace=0.25))
  for row in range(count):
    label = int(queries["labels"][row])
    _tile(axes[row, 0], queries["images"][row], "black", 2)
    axes[row, 0].set_ylabel(_class_name(label, class_names), fontsize=9)
    for e, name in enumerate(names):
      first = 1 + e * (NUM_NEIGHBOURS + 1)
      axes[row, first].axis("off")  # a gap between the encoders
      hits = 0
      for j in range(NUM_NEIGHBOURS):
        same = int(encoders[name]["labels"][row][j]) == label
        hits += same
        _tile(axes[row, first + 1 + j], encoders[name]["images"][row][j],
              "0.75" if same else "red", 1 if same else 3)
      axes[row, first + 1].set_ylabel(f"{hits}/{NUM_NEIGHBOURS}", fontsize=9, rotation=0,
                                      labelpad=14, va="center")
      if row == 0:
        axes[0, first + 3].set_title(f"{name}: {NUM_NEIGHBOURS} nearest training images",
                                     fontsize=11)
  axes[0, 0].set_title("test image", fontsize=11)
  fig.suptitle("Nearest training images by cosine similarity of the frozen embeddings "
               "(x/5: same class as the test image; red frame: another class)", fontsize=11)
  fig.subplots_adjust(left=0.03, right=0.99, bottom=0.02, top=0.9)
  _save(fig, path)
  plt.close(fig)
  return path


def _tile(ax, image, colour, width):
  ax.imshow(image, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(width)


def tsne_2d(features: np.ndarray, seed: int) -> np.ndarray:
  """A 2-D t-SNE map (scikit-learn; PCA initialisation, so runs repeat exactly).

  On one thread: on a shared 2-core VM its OpenMP threads spun for several
  times the CPU time (experiments/speed.md, "t-SNE on one thread").
  """
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
  with threadpool_limits(1):
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed,
                learning_rate="auto").fit_transform(features.astype(np.float32))


def draw_embedding_map(path: str, encoders: Dict[str, Dict], labels: np.ndarray,
                       class_names: Sequence[str], seed: int = 0,
                       titles: Optional[Dict[str, str]] = None) -> str:
  """`encoders`: name -> test embeddings [N, D] (rows aligned with `labels`)."""
  plt = _pyplot()
  n = len(labels)
  keep = np.arange(n)
  if n > MAP_MAX_POINTS:
    keep = np.sort(np.random.default_rng(seed).choice(n, MAP_MAX_POINTS, replace=False))
  labels = labels[keep]
  classes = np.unique(labels)
  cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20
                      else "turbo", max(len(classes), 1))
  fig, axes = plt.subplots(1, len(encoders), figsize=MAP_INCHES, squeeze=False)
  for ax, (name, features) in zip(axes[0], encoders.items()):
    xy = tsne_2d(features[keep], seed)
    for c_index, c in enumerate(classes):
      mask = labels == c
      ax.scatter(xy[mask, 0], xy[mask, 1], s=6, color=cmap(c_index),
                 label=_class_name(int(c), class_names))
    ax.set_title((titles or {}).get(name, name), fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
  if len(classes) <= 20:
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                       markerscale=2, frameon=False)
  shown = f"{len(keep)} of {n}" if len(keep) < n else f"{n}"
  fig.suptitle(f"t-SNE of {shown} test embeddings, coloured by class", fontsize=11)
  fig.subplots_adjust(left=0.02, right=0.86, bottom=0.03, top=0.88, wspace=0.05)
  _save(fig, path)
  plt.close(fig)
  return path
