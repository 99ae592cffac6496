"""A metrics sink off the training loop: its own thread opens it, logs to it and closes it.

TensorBoard's S3 uploads and W&B's ``init`` and ``log`` do network I/O that can take seconds
or hang; the step loop only puts a record on a queue. Such a sink is a copy, not the source
of truth (``metrics.jsonl`` is), so it may never stop the run: one that fails to open or to
log is named in one line and is off for the rest of the process; one that falls behind by
:data:`MAX_PENDING` records drops records (one warning) rather than grow without bound; and
:meth:`BackgroundLogger.close` waits at most ``close_seconds`` for it to finish (a requeue's
grace period is short; a hung sink is left behind, its thread a daemon).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from torchtitan.components.metrics import BaseLogger

log = logging.getLogger(__name__)

MAX_PENDING = 10_000
CLOSE_SECONDS = 60.0
_CLOSE = object()


class BackgroundLogger(BaseLogger):
    """Wraps the sink ``open_sink`` returns; ``describe`` turns an error into one safe line
    (masking credential values)."""

    def __init__(self, name: str, open_sink: Callable[[], BaseLogger],
                 describe: Callable[[BaseException], str] = repr,
                 max_pending: int = MAX_PENDING, close_seconds: float = CLOSE_SECONDS) -> None:
        self.name, self.describe, self.close_seconds = name, describe, close_seconds
        self.failed = False  # set by the thread: nothing more is queued
        self._dropping = False
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, args=(open_sink,), daemon=True,
                                        name=f"fljob-{name}")
        self._thread.start()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.failed:
            return
        try:
            self._queue.put_nowait((metrics, step))
            self._dropping = False
        except queue.Full:
            if not self._dropping:
                log.warning("%s falls behind (%d records waiting): dropping records until it "
                            "catches up; metrics.jsonl has them all", self.name, self._queue.maxsize)
            self._dropping = True

    def close(self) -> None:
        try:
            self._queue.put(_CLOSE, timeout=self.close_seconds)
        except queue.Full:
            pass
        self._thread.join(self.close_seconds)
        if self._thread.is_alive():
            log.warning("%s did not finish within %.0f s; leaving it behind", self.name,
                        self.close_seconds)

    def _run(self, open_sink: Callable[[], BaseLogger]) -> None:
        try:
            sink = open_sink()
        except Exception as exc:  # noqa: BLE001  (network, credentials, a folder: never fatal)
            self._fail("could not start", exc)
            return
        while (item := self._queue.get()) is not _CLOSE:
            try:
                sink.log(*item)
            except Exception as exc:  # noqa: BLE001
                self._fail("failed", exc)
                break
        try:
            sink.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("%s could not close: %s", self.name, self.describe(exc))

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failed = True
        log.error("%s is off for this process: it %s (%s)", self.name, what, self.describe(exc))
        while True:  # release whatever waits on the queue; close() finds the thread gone
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
