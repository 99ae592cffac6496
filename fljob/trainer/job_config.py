"""The job spec as torchtitan 0.2.2's ``JobConfig``: one pure function, no files.

torchtitan reads its whole run configuration from a ``JobConfig`` dataclass tree that its
``ConfigManager`` normally fills from TOML and the command line. fljob has one source of
truth, the spec, so :func:`build_job_config` constructs that tree directly. Two additions
ride on torchtitan's own extension mechanism (a ``JobConfig`` subclass, which is what
``--job.custom_config_module`` merges in):

* ``optimizer`` gains the quasi-hyperbolic ``nus`` and takes fljob's optimizer names,
  because torchtitan hands the optimizer builder only this section;
* ``fljob.spec`` carries the validated spec (as JSON-able data, so the tree stays plain
  data for torchtitan's ``to_dict``/``save_config_file``) for the builders that need more
  than torchtitan has fields for: data, tokenizer, muP model settings, metrics.

Importing this module imports torchtitan, which fixes its device: import it only after
:func:`fljob.trainer.device.use_device`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchtitan.config.job_config import (
    ActivationCheckpoint,
    Checkpoint,
    Comm,
    Compile,
    Debug,
    Job,
    JobConfig,
    LRScheduler,
    Metrics,
    Model,
    Parallelism,
    Training,
    Validation,
)
from torchtitan.config.job_config import Optimizer as TitanOptimizer

from fljob.spec.models import JobSpec

TRAIN_SPEC_NAME = "fljob_mup_llama3"
"""Name under which :mod:`fljob.trainer.train_spec` registers fljob's TrainSpec."""

SAVED_CONFIG_FILE = "job_config.json"
"""Written by rank 0 into the run directory: the exact configuration torchtitan ran with."""


@dataclass
class OptimizerConfig(TitanOptimizer):
    """torchtitan's optimizer section with fljob's names and the QH ``nus``."""

    name: str = "adamw"
    nus: tuple[float, float] = (0.7, 1.0)


@dataclass
class FljobSection:
    """What fljob's builders read beyond torchtitan's own sections."""

    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class FljobJobConfig(JobConfig):
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    fljob: FljobSection = field(default_factory=FljobSection)


def job_spec(job_config: JobConfig) -> JobSpec:
    """The spec a :class:`FljobJobConfig` was built from."""
    if not isinstance(job_config, FljobJobConfig) or not job_config.fljob.spec:
        raise TypeError("fljob's TrainSpec needs a JobConfig made by build_job_config")
    return JobSpec.model_validate(job_config.fljob.spec)


def optimizer_implementation(implementation: str, device: str) -> str:
    """torchtitan's name for the spec's update path on ``device``; "auto" is the fastest one
    the device has (fljob's fused kernels need CUDA)."""
    if implementation == "auto":
        return "fused" if device == "cuda" else "foreach"
    return {"single_tensor": "for-loop"}.get(implementation, implementation)


def build_job_config(spec: JobSpec, device: str) -> FljobJobConfig:
    """torchtitan's configuration for ``spec`` on ``device`` ("cpu" or "cuda")."""
    run_dir = spec.resolved_run_dir
    opt, sched, train = spec.optimizer, spec.schedule, spec.training
    return FljobJobConfig(
        job=Job(dump_folder=run_dir, description=spec.name, save_config_file=SAVED_CONFIG_FILE),
        model=Model(
            name=TRAIN_SPEC_NAME,
            flavor=spec.model.flavor,
            # torchtitan's "HF assets" folder: where the run's tokenizer.json lives.
            hf_assets_path=str(Path(run_dir) / "data"),
        ),
        optimizer=OptimizerConfig(
            name=opt.name,
            lr=opt.lr,
            beta1=opt.betas[0],
            beta2=opt.betas[1],
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            nus=opt.nus,
            implementation=optimizer_implementation(opt.implementation, device),
        ),
        lr_scheduler=LRScheduler(
            warmup_steps=sched.warmup_steps,
            decay_ratio=sched.decay_ratio,
            decay_type=sched.decay_type,
            min_lr_factor=sched.min_lr_factor,
        ),
        training=Training(
            dataset="fljob",  # informational: fljob's dataloader reads spec.data
            local_batch_size=train.local_batch_size,
            global_batch_size=train.global_batch_size or -1,
            seq_len=train.seq_len,
            # No clipping is clipping at infinity: the norm is still computed and logged.
            max_norm=opt.grad_clip_norm or float("inf"),
            steps=train.steps,
            dtype="float32",  # parameters and optimizer state stay float32
            mixed_precision_param=train.dtype,
        ),
        parallelism=Parallelism(
            data_parallel_shard_degree=spec.parallelism.data_parallel_shard_degree,
            data_parallel_replicate_degree=spec.parallelism.data_parallel_replicate_degree,
            tensor_parallel_degree=spec.parallelism.tensor_parallel_degree,
        ),
        # fljob's checkpointer (fljob.trainer.checkpoint) runs from this section. `enable`
        # stays False here because torchtitan's Trainer builds its own local-folder manager
        # from it first; FljobTrainer replaces that inert one with fljob's, enabled.
        checkpoint=Checkpoint(
            enable=False,
            folder=spec.checkpoint.uri or "checkpoints",  # relative: inside run_dir
            interval=spec.checkpoint.interval_steps,
            keep_latest_k=spec.checkpoint.keep_latest,
            # DCP's thread-based async save stages through the accelerator; on the CPU it
            # would only copy the state once more, so CPU runs save synchronously.
            async_mode="async" if spec.checkpoint.async_save and device == "cuda" else "disabled",
            load_step=-1,
            last_save_model_only=False,  # the final save must be able to resume training
        ),
        activation_checkpoint=ActivationCheckpoint(mode=train.activation_checkpoint),
        compile=Compile(enable=train.compile),
        metrics=Metrics(log_freq=train.log_interval, disable_color_printing=True),
        # The flight recorder is NCCL's; on the CPU it would only create empty folders.
        comm=Comm(trace_buf_size=0) if device == "cpu" else Comm(),
        debug=Debug(seed=train.seed, deterministic=train.deterministic),
        # fljob's validator (fljob.trainer.validation) reads its held-out data from the spec;
        # torchtitan builds it when enabled and calls it at the steps it chooses.
        validation=Validation(
            enable=True, dataset="fljob", freq=train.validation_interval,
            steps=train.validation_batches, local_batch_size=train.local_batch_size,
            seq_len=train.seq_len) if train.validation_interval else Validation(),
        fljob=FljobSection(spec=spec.model_dump(mode="json")),
    )
