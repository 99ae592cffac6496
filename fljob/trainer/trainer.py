"""torchtitan's Trainer with the two things fljob adds to its loop: preemption and metrics.

torchtitan's ``train()`` checks ``should_continue_training()`` before every step; this
subclass also stops there once any rank has been signalled (:mod:`.preemption`), so the
step in flight completes, its metrics are logged and :meth:`FljobTrainer.save_for_requeue`
can checkpoint it. Everything else (the step, clipping, schedules, FSDP) is torchtitan's.
"""

from __future__ import annotations

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from fljob.trainer.metrics.processor import FljobMetricsProcessor
from fljob.trainer.preemption import Preemption


class FljobTrainer(Trainer):
    metrics_processor: FljobMetricsProcessor

    def __init__(self, job_config: JobConfig, preemption: Preemption) -> None:
        super().__init__(job_config)
        self.preemption = preemption
        self.preempted = False
        self.metrics_processor.watch(self.optimizers, lambda: self.step)

    def should_continue_training(self) -> bool:
        if not super().should_continue_training():
            return False
        if self.preemption.agreed(self.device):
            self.preempted = True
            logger.warning(f"Preemption requested: stopping after step {self.step}")
            return False
        return True

    def save_for_requeue(self) -> None:
        """Checkpoint the last finished step so that the requeued job resumes from it.

        Goes through torchtitan's checkpointer as a forced final save; object-store
        checkpointing (``fljob.trainer.checkpoint``) plugs in behind it. While the
        checkpointer is disabled nothing is saved and the requeued job starts over.
        """
        if not self.checkpointer.enable:
            logger.warning("Checkpointing is disabled: the requeued job will start from step 0")
            return
        self.checkpointer.save(self.step, last_step=True)
