"""torchtitan's Trainer with what fljob adds to its loop: preemption, divergence, held-out
evaluation reports and the run summary.

torchtitan's ``train()`` runs, per step: ``train_step`` (forward, backward, clipping, the
optimizer step and, on logging steps, the metrics), then ``checkpointer.save``, then the
validator, then ``should_continue_training()`` before the next step. This subclass:

* stops at ``should_continue_training`` once any rank has been signalled
  (:mod:`.preemption`), so the step in flight completes, its metrics are logged and
  :meth:`FljobTrainer.save_for_requeue` can checkpoint it; checkpoints go through fljob's
  object-store checkpointer (:mod:`fljob.trainer.checkpoint`);
* checks at the end of every ``train_step``, so before that step can be saved, whether its
  loss or gradient norm was non-finite on any rank (:mod:`.divergence`: one collective, the
  same verdict everywhere). If so it logs one line naming the step and the likely fixes and
  raises :class:`.divergence.Diverged` on every rank: the step is neither checkpointed nor
  evaluated, and the run ends with exit code 3 (``fljob.exitcodes.DIVERGED``) after its
  summary says ``diverged``. A held-out loss that is not finite ends the run the same way.
  fljob stops rather than skipping the step or rolling back to the last checkpoint: a
  rolled-back run with the same settings meets the same instability again, and skipped
  steps make a run that silently differs from its spec; the decision belongs to the person
  (or the sweep) that chose the settings, and the committed checkpoints stay the good ones;
* hears every held-out evaluation (:mod:`.validation`) and rewrites ``<run_dir>/summary.json``
  (:mod:`fljob.summary`) after each one; :meth:`FljobTrainer.finish` writes the final one;
* keeps the run's ledger (:mod:`.metrics.goodput`): restored from the resumed checkpoint
  before the first step (then the metrics processor opens TensorBoard and W&B under the
  run's tracking id), told when each step begins and ends, carried by every checkpoint.

Everything else (the step, clipping, schedules, FSDP) is torchtitan's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from fljob import storage
from fljob.summary import RunState, RunSummary, read_summary, write_summary
from fljob.trainer.checkpoint import build_checkpointer
from fljob.trainer.checkpoint.store import describe_error, step_name
from fljob.trainer.data.builder import Batch
from fljob.trainer.divergence import LIKELY_FIXES, Diverged, find_non_finite
from fljob.trainer.job_config import job_spec
from fljob.trainer.metrics.goodput import RunLedger
from fljob.trainer.metrics.processor import FljobMetricsProcessor
from fljob.trainer.metrics.prometheus import run_labels
from fljob.trainer.preemption import Preemption
from fljob.trainer.validation import HeldOutValidator


class FljobTrainer(Trainer):
    metrics_processor: FljobMetricsProcessor
    validator: HeldOutValidator

    def __init__(self, job_config: JobConfig, preemption: Preemption) -> None:
        self.began = time.perf_counter()
        super().__init__(job_config)
        self.spec = job_spec(job_config)
        self.checkpointer = build_checkpointer(self)  # object storage, commit protocol
        self.preemption = preemption
        self.preempted = False
        self._started = False
        self._step_losses: list[torch.Tensor] = []
        self.validation: tuple[int, float] | None = None  # (step, held-out loss), the last one
        self.earlier: RunSummary | None = None  # what the attempts before a resume reported
        self.metrics_processor.watch(self.optimizers, lambda: self.step)
        job, run_id = run_labels(self.spec)
        self.ledger = RunLedger(job=job, run_id=run_id, run_dir=self.spec.resolved_run_dir,
                                blocked_seconds=lambda: self.checkpointer.blocked_seconds,
                                rank0=dist.get_rank() == 0)
        self.checkpointer.run_entry = self.ledger.manifest_entry
        if job_config.validation.enable:
            self.validator.listeners.append(self._after_validation)

    def should_continue_training(self) -> bool:
        if not self._started:  # the first check follows the resume: say why nothing will run
            self._started = True
            self._read_earlier_summary()
            self.ledger.resume(self.step, self.checkpointer.resumed_manifest)
            self.metrics_processor.start_run(self.ledger, first_step=self.step + 1)
            steps = self.job_config.training.steps
            if self.step >= steps:
                logger.warning(f"Resumed at step {self.step}, already training.steps ({steps}): nothing "
                               "left to train. Raise training.steps to train on, or start over in "
                               "another run_dir or with checkpoint.resume: false.")
        if not super().should_continue_training():
            return False
        if self.preemption.agreed(self.device):
            self.preempted = True
            logger.warning(f"Preemption requested: stopping after step {self.step}")
            return False
        return True

    def forward_backward_step(self, *, input_dict: dict[str, torch.Tensor], labels: torch.Tensor,
                              global_valid_tokens: torch.Tensor) -> torch.Tensor:
        loss = super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)
        self._step_losses.append(loss.detach())
        return loss

    def train_step(self, data_iterator: Iterator[Batch]) -> None:
        """torchtitan's step, then the divergence check (before the loop may save it)."""
        self.ledger.begin_step()
        self._step_losses = []
        super().train_step(data_iterator)
        grads = [p.grad for part in self.model_parts for p in part.parameters() if p.grad is not None]
        found = find_non_finite(self._step_losses, grads, self.device)
        self._step_losses = []
        if found:
            self._diverge(found.describe() + self._logged_values())
        self.ledger.end_step(self.step)

    def _logged_values(self) -> str:
        """The step's global loss and gradient norm, when this step was logged."""
        mp = self.metrics_processor
        if mp.last_logged_step != self.step:
            return ""
        return f" (loss {mp.last_loss}, gradient norm {mp.last_grad_norm})"

    def _after_validation(self, step: int, loss: float) -> None:
        self.validation = (step, loss)
        self.write_summary("running")
        if not math.isfinite(loss):
            self._diverge(f"the held-out loss ({loss})")

    def _diverge(self, what: str) -> None:
        """Every rank calls this at the same step: log, export, stop the loop."""
        committed = self.checkpointer.committed_step
        message = (f"Diverged at step {self.step}: {what} is not finite. The run stops here "
                   f"(exit code 3); its newest committed checkpoint is "
                   f"{step_name(committed) if committed is not None else 'none'}. Likely fixes: "
                   f"{LIKELY_FIXES}.")
        if dist.get_rank() == 0:
            logger.error(message)
        self.metrics_processor.record_divergence()
        raise Diverged(self.step, message)

    def save_for_requeue(self) -> None:
        """Checkpoint the last finished step so that the requeued job resumes from it.

        A forced final save through fljob's checkpointer: it returns only once the step is
        committed (``latest`` names it) and raises :class:`CheckpointError` (exit 1, not the
        requeue code) when it could not be.
        """
        self.checkpointer.save(self.step, last_step=True)

    # ------------------------------------------------------------------ the run summary

    def _read_earlier_summary(self) -> None:
        """After a resume, keep what the earlier attempts reported up to the resumed step
        (their time, and losses this attempt may not measure again)."""
        if self.step == 0 or dist.get_rank() != 0:
            return
        try:
            earlier = read_summary(self.spec.resolved_run_dir)
        except (OSError, ValueError):
            return
        if earlier is None or earlier.step < self.step:
            return
        self.earlier = earlier
        if (earlier.validation_step is not None and earlier.validation_loss is not None
                and earlier.validation_step <= self.step):
            self.validation = (earlier.validation_step, earlier.validation_loss)

    def summary(self, state: RunState) -> RunSummary:
        """The run's summary as of now (rank 0 knows everything in it)."""
        spec, args, dims, mp = self.spec, self.model_args, self.parallel_dims, self.metrics_processor
        earlier = self.earlier
        train_loss = mp.last_loss if mp.last_logged_step is not None else (
            earlier.train_loss if earlier is not None and earlier.step == self.step else None)
        validation_step, validation_loss = self.validation or (None, None)
        return RunSummary(
            name=spec.name, run_id=run_labels(spec)[1], state=state, step=self.step,
            steps=spec.training.steps, train_loss=train_loss, validation_loss=validation_loss,
            validation_step=validation_step, diverged=state == "diverged",
            # Every data-parallel rank reads as many tokens; the TP peers of one read the same.
            tokens_seen=self.ntokens_seen * (dims.world_size // dims.non_data_parallel_size),
            elapsed_s=(earlier.elapsed_s if earlier else 0.0) + time.perf_counter() - self.began,
            goodput=self.ledger.metrics(),
            params=args.num_params(), width=args.dim, depth=args.n_layers,
            trial=spec.trial.model_dump(mode="json") if spec.trial else None,
            spec=spec.model_dump(mode="json"))

    def write_summary(self, state: RunState) -> None:
        """Rank 0: ``<run_dir>/summary.json``, and beside the checkpoints when those are in
        object storage. A failure is logged, never fatal: the run matters more than its report."""
        if dist.get_rank() != 0:
            return
        uri = self.spec.checkpoint.uri
        try:
            write_summary(Path(self.spec.resolved_run_dir), self.summary(state),
                          copy_to=uri if uri and storage.is_s3(uri) else None)
        except Exception as exc:  # noqa: BLE001  (a full disk, the object store down: one line)
            logger.warning(f"Could not write the run summary: "
                           f"{describe_error(exc, self.checkpointer.store.secrets)}")

    def finish(self, state: RunState) -> None:
        """The final summary, then wait for every rank: a rank exiting non-zero first would
        make torchrun stop rank 0 before it has written it."""
        self.write_summary(state)
        if dist.is_initialized() and dist.get_world_size() > 1:
            done = torch.zeros(1, device=self.device)
            dist.all_reduce(done)
            done.item()

    def close(self) -> None:
        """The ledger's last word (the final save's time, the wall time), then torchtitan's close."""
        self.ledger.save_progress()
        super().close()
