"""The held-out loss during training: fljob's validator in torchtitan's validation protocol.

torchtitan 0.2.2 builds a validator through the TrainSpec's ``build_validator_fn`` when
``job_config.validation.enable`` is set, and its training loop calls
``validator.validate(model_parts, step)`` whenever ``validator.should_validate(step)``, right
after the step's checkpoint save. fljob keeps that protocol (so the loop stays torchtitan's)
but not torchtitan's ``Validator``, which cannot do what fljob needs:

* it reads a Hugging Face text dataset (``build_text_validation_dataloader``), not fljob's
  held-out data, and iterates its loader onward, so each evaluation sees other batches;
* it adds the held-out tokens to the metrics processor's training token count, which would
  inflate fljob's tokens/s and ``fljob_tokens_total``;
* it always validates at step 1, and not necessarily after the last step.

:class:`HeldOutValidator` evaluates the batches that :func:`.data.builder.build_validation_batches`
drew once, when the trainer was built: the same batches at every evaluation and in every
resumed attempt, and the training loader is never touched, so training is exactly what it
would be without validation. Evaluations run every ``training.validation_interval`` steps and
after the last step. The loss is the mean over every held-out token of all data-parallel
ranks (summed, reduced, then divided), the same value on every rank; the model goes back to
train mode afterwards, also when the evaluation fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX, LossFunction
from torchtitan.components.validate import BaseValidator, ValidationContext
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from fljob.trainer.data.builder import Batch
from fljob.trainer.metrics.processor import (
    VALIDATION_TIME_KEY,
    VALIDATION_TOKENS_KEY,
    FljobMetricsProcessor,
)

Listener = Callable[[int, float], None]
"""Called on every rank after each evaluation with ``(step, loss)``."""


class HeldOutValidator(BaseValidator):
    """Evaluates fixed held-out batches; see the module docstring."""

    def __init__(self, job_config: JobConfig, batches: list[Batch], *, parallel_dims: ParallelDims,
                 loss_fn: LossFunction, validation_context: ValidationContext,
                 maybe_enable_amp: AbstractContextManager[None],
                 metrics_processor: FljobMetricsProcessor) -> None:
        super().__init__(job_config)
        self.batches = batches
        self.interval = job_config.validation.freq
        self.last_step = job_config.training.steps
        self.loss_fn, self.validation_context = loss_fn, validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.group = parallel_dims.get_mesh("batch").get_group() if parallel_dims.dp_enabled else None
        self.listeners: list[Listener] = []
        self.stopped = False

    def should_validate(self, step: int) -> bool:
        return not self.stopped and (step % self.interval == 0 or step == self.last_step)

    def stop(self) -> None:
        """No evaluation after this (the run stops: it diverged)."""
        self.stopped = True

    @torch.no_grad()
    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        """Evaluate, report through the metrics processor, then tell the listeners."""
        if len(model_parts) != 1:
            raise ValueError("fljob trains one model part (no pipeline parallelism)")
        begin = time.perf_counter()
        model = model_parts[0]
        device = next(model.parameters()).device  # a DTensor's is its local shard's
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
        model.eval()
        try:
            for inputs, labels in self.batches:
                tokens, labels = inputs["input"].to(device), labels.to(device)
                with self.validation_context(), self.maybe_enable_amp:
                    loss_sum = self.loss_fn(model(tokens), labels)  # summed over tokens
                if isinstance(loss_sum, DTensor):  # loss parallel (TP): replicated
                    loss_sum = loss_sum.full_tensor()
                totals[0] += loss_sum.double()
                totals[1] += (labels != IGNORE_INDEX).sum()
        finally:
            model.train()
        if self.group is not None:
            dist.all_reduce(totals, group=self.group)
        loss_sum_all, tokens_all = totals.tolist()
        loss = loss_sum_all / tokens_all
        self.metrics_processor.log_validation(loss, step, extra_metrics={
            VALIDATION_TOKENS_KEY: int(tokens_all),
            VALIDATION_TIME_KEY: time.perf_counter() - begin})
        for listener in self.listeners:
            listener(step, loss)
