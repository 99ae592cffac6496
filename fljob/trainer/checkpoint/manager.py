"""torchtitan's ``CheckpointManager`` writing to object storage with a commit protocol.

What stays torchtitan's: the states it saves (model, optimizer, lr schedulers, dataloader,
train state), how the model state is flattened, when a step is due (``_should_save``), the
DCP calls and their async mode. What changes (torchtitan 0.2.2 knows only local folders and
treats any ``step-N`` with a ``.metadata`` as good):

* every step goes to ``<uri>/step-<N>/`` through DCP's fsspec writer (``s3://``) or its file
  writer (paths), with the spec's storage settings and no ambient configuration;
* after DCP returns (so every rank's shards and the ``.metadata`` exist) rank 0 writes the
  manifest, the commit marker and then ``latest`` (:class:`.store.CheckpointStore`), and
  tells every rank whether the step committed;
* a failed save is one error line naming the URI and the cause; training goes on and the
  next save tries again. Only the final or pre-requeue save is fatal, because exiting as if
  it had committed would lose work silently;
* resume reads ``latest``, checks the marker, falls back to the newest committed step, and
  never loads an uncommitted one; retention counts committed steps only.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.config import Checkpoint as CheckpointConfig
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import GarbageCollection

from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint.dcp_storage import storage_reader, storage_writer
from fljob.trainer.checkpoint.manifest import build_manifest
from fljob.trainer.checkpoint.store import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    describe_error,
    step_name,
)
from fljob.trainer.metrics.prometheus import record_checkpoint


class FljobCheckpointManager(CheckpointManager):
    """A ``CheckpointManager`` for :class:`CheckpointStore` locations; built by
    :func:`fljob.trainer.checkpoint.build_checkpointer`."""

    def __init__(self, *, store: CheckpointStore, spec: JobSpec, checkpoint_config: CheckpointConfig,
                 keep_latest: int, resume: bool, **components: Any) -> None:
        # torchtitan's own retention counts uncommitted steps too: off, ours replaces it.
        super().__init__(checkpoint_config=dataclasses.replace(checkpoint_config, keep_latest_k=0),
                         sd_adapter=None, base_folder="", **components)
        self.store, self.spec = store, spec
        self.keep_latest, self.resume = keep_latest, resume
        self.folder = store.uri
        self.committed_step: int | None = None  # newest step committed or loaded by this run
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if self.world_size > 1 and not hasattr(self, "pg"):
            # Rank 0 tells the others about the commit; gloo works on every device.
            self.pg = dist.new_group(backend="gloo")
        self.pending_step: int | None = None
        self.async_error: str | None = None
        self.committed_bytes = 0  # shard bytes of the newest commit (rank 0), for metrics
        self.async_committed = threading.Event()

    # ------------------------------------------------------------------ DCP seams

    @torch.no_grad()
    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False) -> Future | None:
        if to_hf:
            raise NotImplementedError("fljob checkpoints are DCP only")
        writer = storage_writer(checkpoint_id, self.store)
        if async_mode == AsyncMode.ASYNC:
            return dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg)
        dcp.save(state_dict, storage_writer=writer)
        if enable_garbage_collection:
            GarbageCollection.collect("GC collection invoked by checkpointer.")
        return None

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool,
                 from_quantized: bool) -> None:
        if from_hf or from_quantized:
            raise NotImplementedError("fljob checkpoints are DCP only")
        dcp.load(state_dict, storage_reader=storage_reader(checkpoint_id, self.store))
        # torchtitan flattens the model's entries into the top level: hand them back.
        self.states["model"].load_state_dict(state_dict)

    # ------------------------------------------------------------------ save

    @torch.no_grad()
    def save(self, curr_step: int, last_step: bool = False) -> None:
        """Save ``curr_step`` if it is due; a failure is fatal only for the final save."""
        if not self._should_save(curr_step, last_step):
            return
        self._async_wait()
        if curr_step == self.committed_step:  # e.g. a requeue right after an interval save
            logger.info(f"{self.store.step_uri(curr_step)} is already committed")
            return
        checkpoint_id = self.store.step_uri(curr_step)
        logger.info(f"Saving {checkpoint_id}")
        begin = time.monotonic()
        states = self._flattened_model_states_sd()
        manifest = build_manifest(self.spec, step=curr_step, world_size=self.world_size,
                                  rank_tokens_seen=int(self.states["train_state"].ntokens_seen))
        asynchronous = self.async_mode == AsyncMode.ASYNC and not last_step
        error = None
        try:
            future = self.dcp_save(states, checkpoint_id, AsyncMode.ASYNC if asynchronous
                                   else AsyncMode.DISABLED, enable_garbage_collection=True)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            error = describe_error(exc, self.store.secrets)
        if asynchronous and error is None:
            self._commit_when_done(curr_step, manifest, future, begin)
            return
        if error is None and self.rank == 0:
            error = self._commit(curr_step, manifest)
        error = self._agree(error)
        self._report(curr_step, error, begin, fatal=last_step)

    def _commit(self, step: int, manifest: dict[str, Any]) -> str | None:
        """Rank 0: manifest, marker, ``latest``, retention. The error line, or None."""
        try:
            self.store.write_object(f"{step_name(step)}/{MANIFEST}", _json(manifest))
            marker = self.store.commit(step, {"time": manifest["time"],
                                              "world_size": self.world_size,
                                              "rank_tokens_seen": manifest["rank_tokens_seen"]})
            self.committed_bytes = int(marker["bytes"])
        except Exception as exc:  # noqa: BLE001  (botocore, aiohttp, OSError...: all one line)
            return describe_error(exc, self.store.secrets)
        try:
            removed = self.store.apply_retention(self.keep_latest)
            if removed:
                logger.info(f"Retention removed {', '.join(map(step_name, removed))} from {self.store.uri}")
        except Exception as exc:  # noqa: BLE001  (committed already; a leftover step is harmless)
            logger.warning(f"Retention in {self.store.uri} failed: "
                           f"{describe_error(exc, self.store.secrets)}")
        return None

    def _agree(self, error: str | None) -> str | None:
        """Rank 0's verdict on every rank, so all of them carry on or stop together."""
        if self.world_size == 1:
            return error
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0, group=self.pg)
        return verdict[0]

    def _report(self, step: int, error: str | None, begin: float, fatal: bool) -> None:
        if error is None:
            self.committed_step = step
            seconds = time.monotonic() - begin
            logger.info(f"Committed {self.store.step_uri(step)} in {seconds:.2f} s")
            if self.rank == 0:  # the exporter's rank; no storage round trip: it may be down now
                record_checkpoint(step, seconds, self.committed_bytes, time.time())
            return
        previous = step_name(self.committed_step) if self.committed_step is not None else "none"
        line = (f"checkpoint {self.store.step_uri(step)} was not committed ({error}); "
                f"the newest committed step is still {previous}")
        if fatal:
            raise CheckpointError(line)
        logger.error(line + "; training continues and the next save tries again")

    # ------------------------------------------------------------------ async save

    def _commit_when_done(self, step: int, manifest: dict[str, Any], future: Future,
                          begin: float) -> None:
        """Async mode: DCP uploads in a thread; rank 0 commits as soon as its future is done
        (DCP's coordinator finishes only after gathering every rank's write results)."""
        self.save_future, self.pending_step = future, step
        self.async_committed.clear()

        def done(fut: Future) -> None:
            try:
                exc = fut.exception()
                error = describe_error(exc, self.store.secrets) if exc is not None else None
                if error is None and self.rank == 0:
                    error = self._commit(step, manifest)
                self.async_error = error
                if self.rank == 0:
                    try:
                        self._report(step, error, begin, fatal=False)
                    except CheckpointError:
                        pass
            finally:
                self.async_committed.set()

        future.add_done_callback(done)

    def _async_wait(self) -> None:
        """Wait for the save in flight and its commit (the Future's waiters wake before its
        callbacks run, hence the event)."""
        if self.save_future is None:
            return
        try:
            self.save_future.result()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        self.async_committed.wait()
        error = self._agree(self.async_error if self.rank == 0 else None)
        if error is None:
            self.committed_step = self.pending_step
        self.save_future = self.pending_step = None

    def close(self) -> None:
        if self.enable:
            self._async_wait()
        super().close()

    # ------------------------------------------------------------------ load

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        """Load the newest committed step (or ``step``); False when there is none."""
        if not self.enable:
            return False
        chosen, error = None, None
        if self.rank == 0:
            try:
                chosen, error = self._choose_step(step)
            except Exception as exc:  # noqa: BLE001  (any storage error: one line, every rank)
                error = (f"cannot read checkpoints in {self.store.uri} "
                         f"({describe_error(exc, self.store.secrets)})")
        verdict = [chosen, error]
        if self.world_size > 1:
            dist.broadcast_object_list(verdict, src=0, group=self.pg)
        chosen, error = verdict
        if error:
            raise CheckpointError(error)
        if chosen is None:
            return False
        checkpoint_id = self.store.step_uri(chosen)
        logger.info(f"Loading {checkpoint_id}")
        begin = time.monotonic()
        try:
            self.dcp_load(self._states_to_load(model_only=False), checkpoint_id,
                          from_hf=False, from_quantized=False)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise CheckpointError(f"loading {checkpoint_id} failed "
                                  f"({describe_error(exc, self.store.secrets)})") from None
        GarbageCollection.collect("GC collection for checkpoint loading.")
        self.committed_step = chosen
        logger.info(f"Loaded {checkpoint_id} in {time.monotonic() - begin:.2f} s")
        return True

    def _choose_step(self, step: int) -> tuple[int | None, str | None]:
        if step >= 0:
            if self.store.is_committed(step):
                return step, None
            return None, f"{self.store.step_uri(step)} is not a committed checkpoint"
        if self.resume:
            return self.store.latest_step(), None
        committed = self.store.committed_steps()
        if committed:
            return None, (f"{self.store.uri} already holds committed checkpoints (newest "
                          f"{step_name(committed[-1])}) and checkpoint.resume is false: set "
                          "resume to true, or point checkpoint.uri at an empty location")
        return None, None


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1).encode()
