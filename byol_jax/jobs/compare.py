"""The compare job: the BYOL encoder of --workdir against the same network at random init.

Both are read out frozen on the config's splits (`byol_jax.evaluate.readout`): kNN and a
linear probe fitted on the training split's features, scored on the held-out
test split, and the collapse monitor on the test projections. The random
encoder is pretraining's own starting point (same config and seed) with its BN
statistics estimated on training images, weights untouched. Writes
compare_results.json and two pictures of the same features
(`byol_jax.evaluate.pictures`: neighbours.png, embedding_map.png), and prints a
short table and where the run's files are.
"""

import json
import os

import jax

from byol_jax import config_lib, fileio
from byol_jax.data import datasets
from byol_jax.evaluate import features as features_lib
from byol_jax.evaluate import knn, pictures, readout
from byol_jax.train import checkpoint

ROWS = (("byol", "BYOL"), ("random", "random init"))


def run(config, workdir: str, mesh) -> dict:
  source = config.linear_eval.pretrained_workdir or workdir
  config, nets, params, state = checkpoint.load_pretrained(config, source, mesh)
  config = _with_pretrain_seed(config, source)
  splits = dict(train_split=config.data.train_split, test_split=config.data.test_split,
                batch_size=config.eval.batch_size, sample=features_lib.HOST_SAMPLE)
  byol = readout.read_out_features(config, nets, params, state, mesh, **splits)
  random = readout.random_baseline(config_lib.prepare(config, mesh), mesh,
                                   bn_split=config.data.train_split,
                                   batch_size=config.eval.batch_size)
  random = readout.read_out_features(*random, mesh, **splits)
  results = {"byol": byol[0], "random": random[0]}
  report = {"results": results, "gaps": _gaps(results), "pretrained_workdir": source,
            "train_split": config.data.train_split, "test_split": config.data.test_split,
            "linear_probe": f"softmax regression on frozen standardised embeddings, Adam "
                            f"{readout.PROBE_STEPS} steps, lr {readout.PROBE_LR}, batches of "
                            f"up to {readout.PROBE_BATCH}, L2 chosen on 10% held out",
            "knn": f"cosine, k={config.eval.knn_k}, T={config.eval.knn_temperature}"}
  features = {name: out[1:] for name, out in zip(dict(ROWS).values(), (byol, random))}
  finite = all(r["finite"] for r in results.values())
  neighbours = nearest_neighbours(features, mesh) if finite else {}  # on every process
  if jax.process_index() == 0:
    report["pictures"] = draw_pictures(config, workdir, features, results, neighbours)
    path = os.path.join(workdir, "compare_results.json")
    fileio.write_text(path, json.dumps(report, indent=2))
    print(table(report), flush=True)
    print(files(source, {"results": path, **report["pictures"]}), flush=True)
  return report


def nearest_neighbours(features: dict, mesh) -> dict:
  """{encoder: (positions, labels) [Q, k]} of the picture's queries' nearest training rows:
  the queries come from the test split's host sample."""
  sample = next(iter(features.values()))[1].sample
  queries = pictures.pick_queries(sample["label"])
  return {name: knn.nearest(train, test.sample["embedding"][queries], mesh,
                            pictures.NUM_NEIGHBOURS)
          for name, (train, test) in features.items()}


def draw_pictures(config, workdir: str, features: dict, results: dict,
                  neighbours: dict) -> dict:
  """neighbours.png and embedding_map.png of each encoder, from the test split's host
  sample (`features.HOST_SAMPLE` rows) and `nearest_neighbours`; {what: path} of those
  drawn."""
  if not all(r["finite"] for r in results.values()):
    print("[compare] no pictures: an encoder gave non-finite features", flush=True)
    return {}
  train_split, test_split = config.data.train_split, config.data.test_split
  sample = next(iter(features.values()))[1].sample
  labels = sample["label"]
  class_names = getattr(datasets.load_source(config, test_split), "class_names", ())
  written = {}
  queries = pictures.pick_queries(labels)
  query_images = datasets.example_images(config, test_split, sample["position"][queries])
  if query_images is None:
    print(f"[compare] no neighbours.png: {test_split} is streamed, without random access to "
          "its images", flush=True)
  else:
    drawn = {name: {"labels": found_labels,
                    "images": [datasets.example_images(config, train_split, p)
                               for p in positions]}
             for name, (positions, found_labels) in neighbours.items()}
    written["neighbours"] = pictures.draw_neighbours(
        os.path.join(workdir, "neighbours.png"),
        {"images": query_images, "labels": labels[queries]}, drawn, class_names)
  titles = {name: f"{name}: kNN {100 * results[key]['knn_top1']:.1f}%" for key, name in ROWS}
  written["embedding map"] = pictures.draw_embedding_map(
      os.path.join(workdir, "embedding_map.png"),
      {name: test.sample["embedding"] for name, (_, test) in features.items()}, labels,
      class_names, seed=config.seed, titles=titles)
  return written


def _with_pretrain_seed(config, source: str):
  """The seed pretraining ran with (its config.json), so `random` is its starting point."""
  path = os.path.join(source, "config.json")
  if fileio.exists(path):
    seed = json.loads(fileio.read_text(path)).get("seed", config.seed)
    if seed != config.seed:
      config = config.copy_and_resolve_references()
      config.seed = seed
  return config


def _gaps(results: dict) -> dict:
  byol, random = results["byol"], results["random"]
  if not (byol["finite"] and random["finite"]):
    return {}
  return {m: byol[m] - random[m] for m in ("knn_top1", "probe_top1")}


def table(report: dict) -> str:
  """The plain table the demo ends with."""
  r = report["results"]["byol"]
  lines = [f"\nBYOL vs random init, frozen encoder: kNN and linear probe fitted on "
           f"{r['num_train_features']} training images, scored on {r['num_test_features']} "
           "held-out test images",
           f"{'encoder':<14}{'kNN top-1':>11}{'linear top-1':>14}{'collapse monitor':>18}"]
  for key, name in ROWS:
    r = report["results"][key]
    if r["finite"]:
      lines.append(f"{name:<14}{100 * r['knn_top1']:>10.1f}%{100 * r['probe_top1']:>13.1f}%"
                   f"{r['projection_spread']:>18.3f}")
    else:
      lines.append(f"{name:<14}{'non-finite features':>43}")
  gaps = report["gaps"]
  if gaps:
    lines.append(f"{'BYOL - random':<14}{100 * gaps['knn_top1']:>+10.1f} "
                 f"{100 * gaps['probe_top1']:>+13.1f}  points")
  lines.append("collapse monitor: spread of the l2-normalised test projections, ~1 spread out, "
               "-> 0 collapsed")
  return "\n".join(lines)


def files(workdir: str, written: dict) -> str:
  """Where the run's files are (those that exist), then what this job `written` ({what: path})."""
  entries = (("curves", "pretrain_curves.png"), ("checkpoints", "checkpoints"),
             ("config", "config.json"), ("metrics", "pretrain_metrics.jsonl"),
             ("TensorBoard", "tensorboard"), ("export", "export"))
  lines = ["\nFiles:"]
  for name, rel in entries:
    path = os.path.join(workdir, rel)
    if fileio.exists(path):
      lines.append(f"  {name:<14} {path}")
  lines += [f"  {name:<14} {path}" for name, path in written.items()]
  return "\n".join(lines)
