"""torchtitan's Trainer with the two things fljob adds to its loop: preemption and metrics.

torchtitan's ``train()`` checks ``should_continue_training()`` before every step; this
subclass also stops there once any rank has been signalled (:mod:`.preemption`), so the
step in flight completes, its metrics are logged and :meth:`FljobTrainer.save_for_requeue`
can checkpoint it; checkpoints go through fljob's object-store checkpointer
(:mod:`fljob.trainer.checkpoint`). Everything else (the step, clipping, schedules, FSDP)
is torchtitan's.
"""

from __future__ import annotations

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from fljob.trainer.checkpoint import build_checkpointer
from fljob.trainer.metrics.processor import FljobMetricsProcessor
from fljob.trainer.preemption import Preemption


class FljobTrainer(Trainer):
    metrics_processor: FljobMetricsProcessor

    def __init__(self, job_config: JobConfig, preemption: Preemption) -> None:
        super().__init__(job_config)
        self.checkpointer = build_checkpointer(self)  # object storage, commit protocol
        self.preemption = preemption
        self.preempted = False
        self._started = False
        self.metrics_processor.watch(self.optimizers, lambda: self.step)

    def should_continue_training(self) -> bool:
        if not self._started:  # the first check follows the resume: say why nothing will run
            self._started = True
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

    def save_for_requeue(self) -> None:
        """Checkpoint the last finished step so that the requeued job resumes from it.

        A forced final save through fljob's checkpointer: it returns only once the step is
        committed (``latest`` names it) and raises :class:`CheckpointError` (exit 1, not the
        requeue code) when it could not be.
        """
        self.checkpointer.save(self.step, last_step=True)
