"""The adapter: fljob's model, optimizers, data and metrics as one torchtitan 0.2.2 TrainSpec.

torchtitan's ``Trainer`` looks its components up by ``job_config.model.name`` in a registry
that external code fills with ``register_train_spec`` (what a module named by
``--experimental.custom_import`` would do on import). fljob registers its spec from Python
instead, once per process and before the trainer is built, because the model's arguments
depend on the run: the flavor and muP settings come from the job spec and the vocabulary
from the run's tokenizer. Every builder has torchtitan's signature and reads what it needs
from the ``JobConfig`` (fljob-only settings from ``job_config.fljob``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import LossFunction, build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.validate import ValidationContext
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from fljob.spec.models import JobSpec
from fljob.trainer.data.builder import build_dataloader, build_tokenizer, build_validation_batches
from fljob.trainer.data.tokenizer import TokenizerFile
from fljob.trainer.job_config import TRAIN_SPEC_NAME, OptimizerConfig, job_spec
from fljob.trainer.metrics.processor import FljobMetricsProcessor
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import args_for_spec
from fljob.trainer.model.model import MuPTransformer
from fljob.trainer.model.mup import mup_param_groups
from fljob.trainer.model.parallelize import parallelize_mup_llama
from fljob.trainer.model.state_dict_adapter import MuPLlamaStateDictAdapter
from fljob.trainer.optim import build_optimizer
from fljob.trainer.optim.builder import QUASI_HYPERBOLIC, WEIGHT_DECAY_MODES
from fljob.trainer.validation import HeldOutValidator


class MuPOptimizersContainer(OptimizersContainer):
    """torchtitan's container over one fljob optimizer per model part.

    torchtitan's own container gives every parameter the same hyperparameters; here each
    part's optimizer is built by ``make`` from that part's muP parameter groups.
    """

    def __init__(self, model_parts: list[nn.Module], make: Callable[[nn.Module], Optimizer]):
        self.model_parts = model_parts
        self.optimizers = [make(part) for part in model_parts]
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self._validate_length(len(model_parts))
        self._post_init(params, dict(self.optimizers[0].defaults))


def build_mup_optimizers(model_parts: list[nn.Module], optimizer_config: OptimizerConfig,
                         parallel_dims: ParallelDims) -> MuPOptimizersContainer:
    """The spec's optimizer over each part's muP groups (lr, weight decay, eps per group)."""
    del parallel_dims  # muP groups work on FSDP/TP-sharded parameters as they are
    cfg = optimizer_config
    hyper: dict[str, Any] = {"betas": (cfg.beta1, cfg.beta2),
                             "foreach": cfg.implementation == "foreach",
                             "fused": cfg.implementation == "fused"}
    if cfg.name in QUASI_HYPERBOLIC:
        hyper["nus"] = tuple(cfg.nus)

    def make(part: nn.Module) -> Optimizer:
        groups = mup_param_groups(
            part, part.model_args, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps,
            weight_decay_mode=WEIGHT_DECAY_MODES[cfg.name])
        return build_optimizer(cfg.name, groups, lr=cfg.lr, eps=cfg.eps,
                               weight_decay=cfg.weight_decay, **hyper)

    return MuPOptimizersContainer(model_parts, make)


def build_spec_tokenizer(job_config: JobConfig) -> TokenizerFile:
    return build_tokenizer(job_spec(job_config))


def build_spec_dataloader(dp_world_size: int, dp_rank: int, tokenizer: TokenizerFile,
                          job_config: JobConfig) -> BaseDataLoader:
    return build_dataloader(job_spec(job_config), dp_rank, dp_world_size, tokenizer)


def build_spec_validator(
    job_config: JobConfig, dp_world_size: int, dp_rank: int, tokenizer: TokenizerFile,
    parallel_dims: ParallelDims, loss_fn: LossFunction, validation_context: ValidationContext,
    maybe_enable_amp: AbstractContextManager[None],
    metrics_processor: FljobMetricsProcessor | None = None, pp_schedule: Any = None,
    pp_has_first_stage: bool | None = None, pp_has_last_stage: bool | None = None,
) -> HeldOutValidator:
    """The held-out validator over this data-parallel rank's batches of the spec's data."""
    if metrics_processor is None or pp_schedule is not None:
        raise ValueError("fljob's validator needs the metrics processor and no pipeline stages")
    del pp_has_first_stage, pp_has_last_stage
    batches = build_validation_batches(job_spec(job_config), dp_rank, dp_world_size, tokenizer)
    return HeldOutValidator(
        job_config, batches, parallel_dims=parallel_dims, loss_fn=loss_fn,
        validation_context=validation_context, maybe_enable_amp=maybe_enable_amp,
        metrics_processor=metrics_processor)


def build_metrics_processor(job_config: JobConfig, parallel_dims: ParallelDims,
                            model_args: ModelArgs | None = None) -> FljobMetricsProcessor:
    del model_args  # FLOPs per token come from the trainer, as in torchtitan
    return FljobMetricsProcessor(job_config, parallel_dims)


def build_train_spec(args: ModelArgs, flavor: str) -> TrainSpec:
    """fljob's TrainSpec with one flavor, ``flavor``, whose arguments are ``args``."""
    return TrainSpec(
        model_cls=MuPTransformer,
        model_args={flavor: args},  # type: ignore[dict-item]  (duck-typed BaseModelArgs)
        parallelize_fn=parallelize_mup_llama,
        pipelining_fn=None,
        build_optimizers_fn=build_mup_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_spec_dataloader,
        build_tokenizer_fn=build_spec_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_metrics_processor_fn=build_metrics_processor,
        build_validator_fn=build_spec_validator,
        state_dict_adapter=MuPLlamaStateDictAdapter,
    )


def register(spec: JobSpec, vocab_size: int) -> None:
    """Register fljob's TrainSpec for ``spec`` under :data:`TRAIN_SPEC_NAME` (once per process)."""
    register_train_spec(TRAIN_SPEC_NAME, build_train_spec(args_for_spec(spec, vocab_size),
                                                          spec.model.flavor))
