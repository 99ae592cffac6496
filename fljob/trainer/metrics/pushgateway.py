"""Pushgateway mode, for sites whose compute nodes Prometheus cannot reach.

A background thread pushes the exporter's registry every ``interval_seconds`` under the
grouping key ``job=<job>, run_id=<run_id>``; :meth:`Pusher.stop` deletes that group, because
the Pushgateway otherwise serves a finished run's last values forever (and Prometheus,
scraping the gateway with ``honor_labels: true``, would keep them alive). Pushing replaces
the whole group (HTTP PUT), so a series the run stopped exporting does not linger either.
A failed push is logged and retried at the next interval: training never waits on it.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway

log = logging.getLogger(__name__)


class Pusher:
    """Pushes ``registry`` to ``url`` periodically until :meth:`stop`."""

    def __init__(self, url: str, registry: CollectorRegistry, job: str, run_id: str,
                 interval_seconds: float) -> None:
        self.url, self.registry, self.job = url, registry, job
        self.grouping_key = {"run_id": run_id}
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fljob-pushgateway", daemon=True)
        self._failing = False

    def start(self) -> Pusher:
        self._thread.start()
        return self

    def push(self) -> None:
        try:
            push_to_gateway(self.url, self.job, self.registry, grouping_key=self.grouping_key,
                            timeout=10)
            if self._failing:
                log.warning("Pushgateway %s reachable again", self.url)
            self._failing = False
        except OSError as e:
            if not self._failing:  # once per outage, not once per interval
                log.warning("Pushgateway push to %s failed (%s); retrying every %.0f s",
                            self.url, e, self.interval)
            self._failing = True

    def _run(self) -> None:
        self.push()
        while not self._stop.wait(self.interval):
            self.push()

    def stop(self) -> None:
        """Stop pushing and delete the run's group from the gateway."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        try:
            delete_from_gateway(self.url, self.job, grouping_key=self.grouping_key, timeout=10)
        except OSError as e:
            log.warning("Could not delete group job=%s run_id=%s from Pushgateway %s (%s): "
                        "delete it by hand", self.job, self.grouping_key["run_id"], self.url, e)
