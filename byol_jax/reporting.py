"""What a person sees of a run: console lines, TensorBoard, metrics.jsonl, a PNG.

Only process 0 reports; the other processes get a Reporter that does nothing,
so callers never branch on the process index. TensorBoard event files are
written with the `tensorboard` package's record writer and protos, which need
no TensorFlow.

On an object store (gs://) nothing can be appended or streamed: rows and
events are held and written as new objects (metrics parts, see `fileio`; one
more event file) every UPLOAD_EVERY_S seconds and at each `flush`, which the
training loop calls before every checkpoint. So the run writes each row once,
and a kill -9 loses only rows past the last checkpoint, which the resumed run
writes again.
"""

import atexit
import io
import json
import math
import os
import socket
import sys
import time
from typing import Dict, Optional

from byol_jax import fileio

# On object stores: how often the held rows and events are written.
UPLOAD_EVERY_S = 60.0
PLOTTED = ("byol_loss", "learning_rate", "tau", "probe_top1", "eval/probe_top1", "eval/knn_top1",
           "projection_std")


class Reporter:
  """Writes scalar metrics for a job under `workdir`."""

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int, enabled: bool = True,
               name: str = "pretrain"):
    self.enabled = enabled
    self.total_steps, self.batch_size, self.name = total_steps, batch_size, name
    self.workdir = workdir
    self.jsonl_path = os.path.join(workdir, f"{name}_metrics.jsonl")
    self._writer = None
    self._last: Optional[tuple] = None  # (time, step) at the last timed report
    self._held = [] if not fileio.streams(workdir) else None  # rows not yet written
    self._uploaded = time.monotonic()
    if enabled:
      fileio.makedirs(workdir)
      self._writer = EventWriter(os.path.join(workdir, "tensorboard", name))
      if self._held is not None:
        atexit.register(self._flush_at_exit)  # an error's exit keeps the held rows too

  def flush(self) -> None:
    """Writes the rows and events held for an object store (a no-op elsewhere)."""
    if not self.enabled or self._held is None:
      return
    if self._held:
      fileio.append_text(self.jsonl_path, "".join(self._held))
      self._held = []
    self._writer.flush()
    self._uploaded = time.monotonic()

  def _flush_at_exit(self) -> None:
    try:
      self.flush()
    except Exception as e:  # noqa: BLE001 - at exit a warning is all that can be done
      print(f"[{self.name}] warning: could not write the last metrics rows to "
            f"{self.jsonl_path}: {e}", file=sys.stderr, flush=True)

  def start_timer(self, step: int) -> None:
    self._last = (time.perf_counter(), step)

  def drop_after(self, step: int) -> None:
    """Drops the metrics rows past `step` (and a row cut short by a kill): a run
    resumed at `step` writes them again, so each step stays in the file once."""
    self.flush()
    if not self.enabled or not fileio.exists(self.jsonl_path):
      return
    text = fileio.read_text(self.jsonl_path)
    lines = [line for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if kept == lines and text.endswith("\n"):
      return
    fileio.write_text(self.jsonl_path, "".join(line + "\n" for line in kept))
    if len(kept) < len(lines):
      print(f"[{self.name}] resuming at step {step}: dropped {len(lines) - len(kept)} metrics "
            f"row(s) past it from {self.jsonl_path}; they are written again.", flush=True)

  def rows(self, until: int) -> list:
    """The metrics rows already written up to step `until`; a row cut short by a kill is
    skipped."""
    self.flush()
    if not self.enabled or not fileio.exists(self.jsonl_path):
      return []
    rows = []
    for line in fileio.read_text(self.jsonl_path).splitlines():
      step = _row_step(line)
      if step is not None and step <= until:
        rows.append(json.loads(line))
    return rows

  def write(self, step: int, metrics: Dict[str, float], *, timed: bool = True) -> None:
    """Reports metrics at `step`; with `timed`, adds steps/s, images/s and the ETA."""
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    if timed and self._last is not None and step > self._last[1]:
      now = time.perf_counter()
      steps_per_s = (step - self._last[1]) / max(now - self._last[0], 1e-9)
      metrics["steps_per_s"] = steps_per_s
      metrics["images_per_s"] = steps_per_s * self.batch_size
      self._last = (now, step)
      eta = (self.total_steps - step) / steps_per_s
      eta_text = f" | ETA {_duration(eta)}"
    else:
      eta_text = ""
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
    print(f"[{self.name}] step {step}/{self.total_steps} | {shown}{eta_text}", flush=True)
    row = json.dumps({"step": step, **metrics}) + "\n"
    self._writer.scalars(step, metrics)
    if self._held is None:
      fileio.append_text(self.jsonl_path, row)
      return
    self._held.append(row)
    if time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
      self.flush()

  def plot(self, path: Optional[str] = None) -> Optional[str]:
    """Draws the curves of metrics.jsonl into a PNG; returns its path."""
    self.flush()
    if not self.enabled or not fileio.exists(self.jsonl_path):
      return None
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    records = read_jsonl(self.jsonl_path)
    keys = [k for k in PLOTTED if any(k in r for r in records)]
    if not keys:
      return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
      points = [(r["step"], r[key]) for r in records if key in r]
      ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
      ax.set_title(key)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(self.workdir, f"{self.name}_curves.png")
    with fileio.atomic_local_path(path) as tmp:
      fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


class EventWriter:
  """Appends scalar summaries to a TensorBoard event file in `logdir`, without TensorFlow.

  The file is a TFRecord stream of `Event` protos, the first naming the format
  version, as `tf.summary` writes it; scalars go as `simple_value`s, which
  TensorBoard reads as its scalar plots. On an object store the events are
  held until `flush`, which writes them as one more event file (TensorBoard
  reads every file of the directory).
  """

  def __init__(self, logdir: str):
    # pylint: disable=g-import-not-at-top  # protobuf modules: only when reporting
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._record_writer = RecordWriter
    self.logdir = logdir
    fileio.makedirs(logdir)
    self.path = self._new_path()
    self._streamed = fileio.streams(logdir)
    self._file = fileio.open_for_writing(self.path) if self._streamed else io.BytesIO()
    self._records = RecordWriter(self._file)
    self._pending = False  # events held for an object store
    self._start()

  def _new_path(self) -> str:
    # tf.summary's naming, so TensorBoard orders the files of a resumed run.
    return os.path.join(self.logdir, f"events.out.tfevents.{time.time():.6f}."
                                     f"{socket.gethostname()}.{os.getpid()}.byol_jax.v2")

  def _start(self) -> None:
    self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v))
                                   for k, v in values.items()])
    self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))
    self._pending = True

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    if self._streamed:
      self._file.flush()

  def flush(self) -> None:
    """On an object store: writes the events held since the last flush as a new file."""
    if self._streamed or not self._pending:
      return
    fileio.write_bytes(self.path, self._file.getvalue())
    self.path, self._pending = self._new_path(), False
    self._file = io.BytesIO()
    self._records = self._record_writer(self._file)
    self._start()

  def close(self) -> None:
    self.flush()
    self._file.close()


def read_jsonl(path: str):
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def _row_step(line: str) -> Optional[int]:
  """The step of a metrics row; None for a partial row (a kill mid-write)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def _fmt(v: float) -> str:
  if not math.isfinite(v):
    return str(v)
  return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
