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
* a failed save is one error line naming the URI and the cause; rank 0 removes what it left
  (a save that ran out of space must not keep the space the next one needs), training goes
  on and the next save tries again. Only the final or pre-requeue save is fatal, because
  exiting as if it had committed would lose work silently;
* rank 0 holds the location's lock for the whole run (:mod:`.lock`), checks it before every
  save and commit, and clears whatever an earlier attempt left under the step it saves;
* resume reads ``latest``, checks the marker, falls back to the newest committed step, and
  never loads an uncommitted one; retention counts committed steps only;
* the step to resume is checked before DCP reads it: its files against the sizes its marker
  recorded, and its manifest's compatibility record against the current spec
  (:mod:`.compat`). A damaged step is logged, loses its marker (so it no longer counts as
  committed) and resume falls back to the newest intact committed step; with none intact,
  or when the spec changed what the checkpoint depends on, the run stops before loading.

Every refusal or failure reaches every rank as the same exception (rank 0 decides, the
others hear it): :class:`fljob.errors.UsageError` (exit 2) for what the user must change (a
held lock, an incompatible spec), :class:`.store.CheckpointError` (exit 1) otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.config import Checkpoint as CheckpointConfig
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import GarbageCollection

from fljob.errors import UsageError
from fljob.spec.loader import dump_spec
from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint.compat import compare
from fljob.trainer.checkpoint.dcp_storage import storage_reader, storage_writer
from fljob.trainer.checkpoint.lock import CheckpointLock, lock_for
from fljob.trainer.checkpoint.manifest import build_manifest
from fljob.trainer.checkpoint.store import (
    COMMIT_MARKER,
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    describe_error,
    step_name,
)
from fljob.trainer.metrics.prometheus import record_checkpoint

T = TypeVar("T")
UPDATE_PATH_KEYS = ("foreach", "fused")
"""Optimizer group entries that say how this process computes a step, not what was learned:
kept from the current run when a checkpoint's groups are loaded (a fused group saved on a GPU
must not reach a CPU run)."""


class FljobCheckpointManager(CheckpointManager):
    """A ``CheckpointManager`` for :class:`CheckpointStore` locations; built by
    :func:`fljob.trainer.checkpoint.build_checkpointer`."""

    def __init__(self, *, store: CheckpointStore, spec: JobSpec, checkpoint_config: CheckpointConfig,
                 keep_latest: int, resume: bool, compatibility: Mapping[str, Any],
                 **components: Any) -> None:
        # torchtitan's own retention counts uncommitted steps too: off, ours replaces it.
        super().__init__(checkpoint_config=dataclasses.replace(checkpoint_config, keep_latest_k=0),
                         sd_adapter=None, base_folder="", **components)
        self.store, self.spec, self.compatibility = store, spec, dict(compatibility)
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
        # Goodput (fljob.trainer.metrics.goodput): what every manifest carries of the run (its
        # tracking id and ledger), the resumed step's manifest (rank 0), and the time the
        # training loop spent in saves that were due.
        self.run_entry: Callable[[], Mapping[str, Any]] = dict
        self.resumed_manifest: dict[str, Any] | None = None
        self.blocked_seconds = 0.0
        self.lock: CheckpointLock | None = None  # rank 0's
        self._on_rank0(self._take_lock, f"cannot lock the checkpoint location {store.uri}")

    def _take_lock(self) -> None:
        self.lock = lock_for(self.store)
        self.lock.acquire()

    def _on_rank0(self, action: Callable[[], T], failure: str) -> T:
        """Run ``action`` on rank 0 and give every rank its outcome: the value, or the same
        exception (UsageError stays one; any other becomes a CheckpointError that starts
        with ``failure`` unless it is one already)."""
        outcome: list[Any] = [None, None, None]  # value, kind, message
        if self.rank == 0:
            try:
                outcome[0] = action()
            except UsageError as exc:
                outcome[1:] = [UsageError, str(exc)]
            except CheckpointError as exc:
                outcome[1:] = [CheckpointError, str(exc)]
            except Exception as exc:  # noqa: BLE001  (botocore, aiohttp, OSError...: one line)
                outcome[1:] = [CheckpointError, f"{failure} ({describe_error(exc, self.store.secrets)})"]
        if self.world_size > 1:
            dist.broadcast_object_list(outcome, src=0, group=self.pg)
        value, kind, message = outcome
        if kind is not None:
            raise kind(message)
        return value

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
        began = time.monotonic()
        try:
            self._save(curr_step, last_step)
        finally:
            self.blocked_seconds += time.monotonic() - began

    def _save(self, curr_step: int, last_step: bool) -> None:
        self._async_wait()
        if curr_step == self.committed_step:  # e.g. a requeue right after an interval save
            logger.info(f"{self.store.step_uri(curr_step)} is already committed")
            return
        checkpoint_id = self.store.step_uri(curr_step)
        logger.info(f"Saving {checkpoint_id}")
        begin = time.monotonic()
        # Fatal when the lock is no longer ours: another run writes here now.
        error = self._on_rank0(lambda: self._clear(curr_step), f"cannot save {checkpoint_id}")
        written = error is None  # else the store is out of reach: nothing to remove either
        asynchronous = self.async_mode == AsyncMode.ASYNC and not last_step
        manifest = build_manifest(self.spec, step=curr_step, world_size=self.world_size,
                                  rank_tokens_seen=int(self.states["train_state"].ntokens_seen),
                                  compatibility=self.compatibility, run=self.run_entry())
        if error is None:
            try:
                future = self.dcp_save(self._flattened_model_states_sd(), checkpoint_id,
                                       AsyncMode.ASYNC if asynchronous else AsyncMode.DISABLED,
                                       enable_garbage_collection=True)
            except BaseException as exc:  # DCP's CheckpointException is a BaseException
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                error = describe_error(exc, self.store.secrets)
        if asynchronous and error is None:
            self._commit_when_done(curr_step, manifest, future, begin)
            return
        if error is None and self.rank == 0:
            error = self._commit(curr_step, manifest)
        error = self._agree(self._with_free_space(error) if self.rank == 0 else error)
        if error is not None and written and self.rank == 0:
            self._discard(curr_step)
        self._report(curr_step, error, begin, fatal=last_step)

    def _clear(self, step: int) -> str | None:
        """Rank 0, before a save: the lock must still be ours (CheckpointError otherwise: the
        run stops), and ``step`` must start empty (DCP must not mix its files with an earlier
        attempt's). The error line when the store cannot be reached (this save fails, the run
        goes on), else None."""
        try:
            self.lock.check()
            left = self.store.files(step)
            if left:
                state = "committed, but this run resumed from an older step" \
                    if COMMIT_MARKER in left else "never committed"
                logger.warning(f"Removing {self.store.step_uri(step)}, left by an earlier attempt "
                               f"({state}), before saving that step again")
                self.store.remove_step(step)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001  (the store may be down: this save fails)
            return describe_error(exc, self.store.secrets)
        return None

    def _with_free_space(self, error: str | None) -> str | None:
        """A failed local write with the free space added: torch.save reports a full disk as
        "unexpected pos 704 vs 598", which says nothing to a person."""
        if error is None or not self.store.local:
            return error
        try:
            free = shutil.disk_usage(self.store.uri).free
        except OSError:
            return error
        return f"{error}; {free / 2**20:.1f} MiB free in {self.store.uri}"

    def _discard(self, step: int) -> None:
        """Rank 0, after a failed save: remove what it left, marker first, so that it neither
        counts nor keeps the space the next save needs. Not when the lock is lost: the step
        may be another run's now."""
        try:
            self.lock.check()
            if self.store.files(step):
                self.store.remove_step(step)
                logger.info(f"Removed the partial {self.store.step_uri(step)}")
        except CheckpointError as exc:
            logger.warning(f"Left the partial {self.store.step_uri(step)} alone: {exc}")
        except Exception as exc:  # noqa: BLE001  (retention removes it after the next commit)
            logger.warning(f"Could not remove the partial {self.store.step_uri(step)} "
                           f"({describe_error(exc, self.store.secrets)}); retention removes it "
                           "after the next commit")

    def _commit(self, step: int, manifest: dict[str, Any]) -> str | None:
        """Rank 0: manifest, marker, ``latest``, retention. The error line, or None."""
        try:
            self.lock.check()  # a save can outlast a lease: commit only while it is ours
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
                if error is not None and self.rank == 0:
                    error = self._with_free_space(error)
                    self._discard(step)
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
        """Wait for a save in flight, then give the lock back (also when that wait fails).
        Safe to call twice, and on a manager whose construction failed."""
        try:
            if self.enable and hasattr(self, "async_committed"):
                self._async_wait()
            super().close()
        finally:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ load

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        """Load the newest intact committed step (or ``step``); False when there is none."""
        if not self.enable:
            return False
        chosen = self._on_rank0(lambda: self._choose_step(step),
                                f"cannot read checkpoints in {self.store.uri}")
        if chosen is None:
            if step < 0:  # nothing of this run to resume: checkpoint.init_from, if set, gives the weights
                from fljob.trainer.hf.init_from import init_model_from

                init_model_from(self.spec, self.states["model"])
            return False
        checkpoint_id = self.store.step_uri(chosen)
        logger.info(f"Loading {checkpoint_id}")
        begin = time.monotonic()
        update_paths = self._update_paths()
        try:
            self.dcp_load(self._states_to_load(model_only=False), checkpoint_id,
                          from_hf=False, from_quantized=False)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise CheckpointError(f"loading {checkpoint_id} failed "
                                  f"({describe_error(exc, self.store.secrets)})") from None
        self._restore_update_paths(update_paths)
        GarbageCollection.collect("GC collection for checkpoint loading.")
        self.committed_step = chosen
        logger.info(f"Loaded {checkpoint_id} in {time.monotonic() - begin:.2f} s")
        return True

    def _update_paths(self) -> list[list[dict[str, Any]]]:
        """Each optimizer group's :data:`UPDATE_PATH_KEYS` as this run built them."""
        return [[{k: g[k] for k in UPDATE_PATH_KEYS if k in g} for g in optimizer.param_groups]
                for optimizer in self.states["optimizer"].optimizers]

    def _restore_update_paths(self, paths: list[list[dict[str, Any]]]) -> None:
        for optimizer, groups in zip(self.states["optimizer"].optimizers, paths, strict=True):
            for group, keys in zip(optimizer.param_groups, groups, strict=True):
                group.update(keys)

    def _choose_step(self, step: int) -> int | None:
        """Rank 0: the step to load, checked (intact, compatible with the spec); None for a
        fresh start. Raises what every rank must raise."""
        if step >= 0:
            record = self.store.commit_record(step)
            if record is None:
                raise CheckpointError(f"{self.store.step_uri(step)} is not a committed checkpoint")
            damage = self.store.damage(step, record)
            if damage:
                raise CheckpointError(f"{self.store.step_uri(step)} is damaged: {damage}; restore "
                                      "it, or load another step")
            chosen: int | None = step
        elif self.resume:
            chosen = self._newest_intact()
        else:
            committed = self.store.committed_steps()
            if committed:
                raise UsageError(f"{self.store.uri} already holds committed checkpoints (newest "
                                 f"{step_name(committed[-1])}) and checkpoint.resume is false: set "
                                 "resume to true, or point checkpoint.uri at an empty location")
            chosen = None
        if chosen is not None:
            self._check_compatibility(chosen)
        return chosen

    def _newest_intact(self) -> int | None:
        """``latest``'s step when its files are as its marker recorded; else the newest older
        committed step that is, once every newer damaged one lost its marker (logged). With
        no intact step at all nothing is changed and the run stops."""
        latest = self.store.latest_step()
        if latest is None:
            return None
        damaged: list[tuple[int, str]] = []
        for step in self._resume_candidates(latest):
            record = self.store.commit_record(step)
            why = self.store.damage(step, record) if record else "its commit marker vanished"
            if why is None:
                break
            damaged.append((step, why))
        else:
            first, why = damaged[0]
            more = f" and {len(damaged) - 1} older steps too" if len(damaged) > 1 else ""
            raise CheckpointError(f"no intact committed checkpoint in {self.store.uri}: "
                                  f"{step_name(first)} is damaged ({why}){more}; restore the "
                                  "files, or start fresh with another checkpoint.uri")
        for bad, why in damaged:
            logger.warning(f"{self.store.step_uri(bad)} is damaged ({why}): it no longer counts as "
                           f"committed (its marker is removed) and this run resumes from "
                           f"{step_name(step)} instead")
            self.store.uncommit(bad)
        if damaged:
            self.store.point_latest(step)
        return step

    def _resume_candidates(self, latest: int) -> Iterator[int]:
        """``latest``, then the older committed steps, newest first (listed only if needed)."""
        yield latest
        yield from reversed([s for s in self.store.committed_steps() if s < latest])

    def _check_compatibility(self, step: int) -> None:
        """Refuse a step the current spec cannot resume; log what changed that may."""
        raw = self.store.read_object(f"{step_name(step)}/{MANIFEST}")
        try:
            manifest = json.loads(raw) if raw is not None else {}
        except ValueError:
            manifest = {}
        step_uri = self.store.step_uri(step)
        self.resumed_manifest = manifest if isinstance(manifest, dict) else {}
        result = compare(self.resumed_manifest, self.compatibility, dump_spec(self.spec))
        if result.incompatible:
            raise UsageError(result.refusal(step_uri))
        if len(result.unrecorded) == len(self.compatibility):
            logger.warning(f"{step_uri} has no compatibility record (an older fljob wrote it, or "
                           "its manifest is unreadable): the spec cannot be checked against it; "
                           "resuming anyway")
        elif result.unrecorded:
            logger.warning(f"{step_uri} does not record {', '.join(result.unrecorded)}: not checked")
        if result.kept:
            logger.warning(f"Resuming {step_uri} with {', '.join(map(str, result.kept))}: no "
                           "effect, the checkpoint restores its own value (start fresh to use "
                           "the new one)")
        if result.applied:
            logger.info(f"Resuming {step_uri} with changed settings: "
                        f"{', '.join(map(str, result.applied))}")


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1).encode()
