"""TensorBoard and Weights & Biases: fljob's records beside Prometheus, one run across restarts.

Rank 0 hands every fljob record (:mod:`.processor`) to these sinks, as it does to the JSONL
file and to Prometheus; torchtitan's own TensorBoard/W&B loggers stay off (they would log
torchtitan's names, not fljob's record). Both sinks open once the checkpoint is loaded,
under the run's tracking id (:mod:`.goodput`): every process of a run writes the same
TensorBoard folder and the same W&B run.

Keys are the record's, flattened with ``/`` (``loss``, ``lr/hidden``,
``optim/hidden/update_ratio``, ``goodput/ratio``, ``validation_loss``), at the record's
step. ``elapsed_s`` is left out: it is each process's own clock, and TensorBoard and W&B keep
wall time themselves.

TensorBoard: event files in ``<metrics.tensorboard>/<tracking id>/`` (a relative folder is
taken inside the run folder). Each process starts a new file whose first event is a
``SessionLog.START`` at the step it resumes with, which TensorBoard's readers take as a
restart: they drop what an earlier process logged at that step or later, so the steps a
killed process trained but never committed show once, as the resumed process logged them.
For ``s3://`` the files are written into ``<run_dir>/tensorboard-upload/<tracking id>/`` and
uploaded whole, one PUT each (with the spec's storage settings, like ``summary.json``), every
:data:`UPLOAD_SECONDS` and at close; a file past :data:`ROTATE_BYTES` is closed and uploaded a
last time, and a new one started, so no upload grows past that. An upload that fails is
logged once and retried at the next; what a killed process left in the folder goes up with
the next process's first upload. (TensorBoard's own ``s3://`` writer reads ``S3_ENDPOINT``
and ambient credentials instead of the spec's storage section, and rewrites the whole file
at every flush.)

W&B: ``wandb.init(id=<tracking id>, resume="allow")`` in the spec's project, entity and
mode, its files under ``<run_dir>/wandb`` (``wandb sync`` uploads an offline run later; the
files of every process of the run carry the same id and sync into one run). The config is
the spec without ``env`` and without any credential reference (:func:`public_config`); the
API key reaches W&B only as ``WANDB_API_KEY``, which the backends set from the spec's
reference. Console capture is off: the run's log is already in the run folder or the SLURM
log. W&B keeps a run's steps increasing: after a kill it ignores the re-logged steps it
already has (their values stay those of the killed process).

Both run off the training loop (:mod:`.background`: each in its own thread, opened there
too), and neither can stop the training: one that fails to open or to log is named in one
line, with any credential value masked, and is off for the rest of the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from torchtitan.components.metrics import BaseLogger

from fljob import storage
from fljob.spec.models import JobSpec, SecretRef
from fljob.trainer.checkpoint.store import describe_error, normalize_uri
from fljob.trainer.metrics.background import BackgroundLogger

log = logging.getLogger(__name__)

UNTRACKED = frozenset({"elapsed_s"})
"""Record keys the trackers do not log (see the module docstring)."""
UPLOAD_SECONDS = 120.0
ROTATE_BYTES = 16 * 2**20
LOCAL_FLUSH_SECONDS = 10.0
UPLOAD_FOLDER = "tensorboard-upload"
SECRET_ENV = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Variables whose values are masked in any message of this module (with the spec's
``secret_env``)."""


def _secret_values(extra: Iterable[str] = ()) -> list[str]:
    return [v for k in (*SECRET_ENV, *extra) if (v := os.environ.get(k))]


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"lr": {"hidden": 0.1}}`` -> ``{"lr/hidden": 0.1}``; numbers only, :data:`UNTRACKED` out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in UNTRACKED:
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardSink(BaseLogger):
    """fljob records as TensorBoard scalars in one run folder, local or uploaded to S3."""

    # TensorBoard reads a folder's event files in name order. A name starts with the second
    # the file was opened, then host, pid and a per-process counter that is not zero-padded,
    # so two files opened in one second can sort out of order (``...9`` after ``...10``), and
    # the reader would take the later one's steps for a restart. One new file per second.
    _open_lock = threading.Lock()
    _last_open_second = 0

    def __init__(self, folder: str, first_step: int, staging: Path | None = None,
                 upload_seconds: float = UPLOAD_SECONDS, rotate_bytes: int = ROTATE_BYTES) -> None:
        """``folder`` is the run's TensorBoard folder: a path, or an ``s3://`` prefix whose files
        are written in ``staging`` first. ``first_step`` is the first step this process logs."""
        self.folder, self.staging = folder, staging
        self.local = Path(folder) if staging is None else staging
        self.upload_seconds, self.rotate_bytes = upload_seconds, rotate_bytes
        self._upload_failed = False
        self.local.mkdir(parents=True, exist_ok=True)
        self._open()
        self._writer.add_event(Event(wall_time=time.time(), step=first_step,
                                     session_log=SessionLog(status=SessionLog.START)))
        self._uploaded_at = time.monotonic()

    def _open(self) -> None:
        self._suffix = f".fljob-{uuid.uuid4().hex[:12]}"  # tells the open file from the others
        cls = TensorBoardSink
        with cls._open_lock:
            time.sleep(max(0.0, cls._last_open_second + 1 - time.time()))
            self._writer = EventFileWriter(str(self.local), flush_secs=LOCAL_FLUSH_SECONDS,
                                           filename_suffix=self._suffix)
            cls._last_open_second = int(time.time())  # at or after the second in the name

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = [Summary.Value(tag=k, simple_value=v) for k, v in flatten(metrics).items()]
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        if self.staging is not None and time.monotonic() - self._uploaded_at >= self.upload_seconds:
            self._upload(final=False)

    def _upload(self, final: bool) -> None:
        """Upload every file in the staging folder; closed ones are removed once uploaded. The
        open file is closed first at the end, or once it has grown past the rotation size."""
        current = next(self.local.glob(f"*{self._suffix}"))
        rotate = final or current.stat().st_size >= self.rotate_bytes
        if rotate:
            self._writer.close()
        else:
            self._writer.flush()
        for path in sorted(self.local.glob("events.out.tfevents.*")):
            try:
                storage.write_bytes(storage.join(self.folder, path.name), path.read_bytes())
            except Exception as exc:  # noqa: BLE001  (botocore, the network: retried next time)
                if not self._upload_failed:
                    log.warning("TensorBoard: cannot upload %s to %s (%s); retrying every %.0f s",
                                path.name, self.folder, describe_error(exc, _secret_values()),
                                self.upload_seconds)
                self._upload_failed = True
                break
            if rotate or path != current:
                path.unlink()
        else:
            if self._upload_failed:
                log.warning("TensorBoard: uploads to %s work again", self.folder)
            self._upload_failed = False
        if rotate and not final:
            self._open()
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.staging is not None:
            self._upload(final=True)
        else:
            self._writer.close()


def _secret_fields(model: BaseModel) -> dict[str, Any]:
    """pydantic's ``exclude`` for every credential reference in ``model``."""
    exclude: dict[str, Any] = {}
    for name, value in model:
        if isinstance(value, SecretRef) or isinstance(value, dict) and any(
                isinstance(v, SecretRef) for v in value.values()):
            exclude[name] = True
        elif isinstance(value, BaseModel) and (inner := _secret_fields(value)):
            exclude[name] = inner
    return exclude


def public_config(spec: JobSpec) -> dict[str, Any]:
    """The spec as W&B config: all of it but ``env`` (plain values that may be anything) and
    the credential references (``secret_env``, the storage keys, the W&B key)."""
    return spec.model_dump(mode="json", exclude={**_secret_fields(spec), "env": True})


class WandbSink(BaseLogger):
    """fljob records as the history of one W&B run, resumed by every process of the fljob run."""

    def __init__(self, spec: JobSpec, tracking_id: str) -> None:
        import wandb

        config = spec.metrics.wandb
        assert config is not None
        self.run = wandb.init(
            project=config.project, entity=config.entity, mode=config.mode, id=tracking_id,
            resume="allow", name=spec.name, group=spec.trial.sweep if spec.trial else None,
            tags=config.tags or None, job_type="train", dir=spec.resolved_run_dir,
            config=public_config(spec), settings=wandb.Settings(console="off", silent=True))
        where = self.run.dir if config.mode == "offline" else self.run.url
        log.info("W&B run %s (%s): %s", tracking_id, config.mode, where)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(flatten(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def tensorboard_folder(spec: JobSpec, run_tracking_id: str) -> str:
    """``<metrics.tensorboard>/<tracking id>``: an s3:// URI, or an absolute path."""
    assert spec.metrics.tensorboard is not None
    return storage.join(normalize_uri(spec.metrics.tensorboard, spec.resolved_run_dir), run_tracking_id)


def open_tracking_sinks(spec: JobSpec, run_tracking_id: str, first_step: int) -> list[BackgroundLogger]:
    """The TensorBoard and W&B sinks the spec asks for, each opening in its own thread."""
    def describe(exc: BaseException) -> str:
        return describe_error(exc, _secret_values(spec.secret_env))

    sinks: list[BackgroundLogger] = []
    if spec.metrics.tensorboard is not None:
        folder = tensorboard_folder(spec, run_tracking_id)
        staging = (Path(spec.resolved_run_dir) / UPLOAD_FOLDER / run_tracking_id
                   if storage.is_s3(folder) else None)
        sinks.append(BackgroundLogger("TensorBoard", lambda: TensorBoardSink(folder, first_step, staging),
                                      describe))
    if spec.metrics.wandb is not None:
        sinks.append(BackgroundLogger("W&B", lambda: WandbSink(spec, run_tracking_id), describe))
    return sinks
