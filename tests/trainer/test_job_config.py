"""The spec -> torchtitan JobConfig mapping (pure; no process group, no model)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

pytest.importorskip("torchtitan")

from fljob.spec.models import JobSpec
from fljob.trainer.job_config import (
    TRAIN_SPEC_NAME,
    FljobJobConfig,
    build_job_config,
    job_spec,
)


def make_spec(**fields: object) -> JobSpec:
    return JobSpec.model_validate({"name": "tiny-mup", "run_dir": "/tmp/runs/{name}", **fields})


def test_defaults_map_onto_torchtitan_sections() -> None:
    spec = make_spec()
    cfg = build_job_config(spec, "cpu")
    assert cfg.job.dump_folder == "/tmp/runs/tiny-mup"
    assert cfg.job.description == "tiny-mup"
    assert (cfg.model.name, cfg.model.flavor) == (TRAIN_SPEC_NAME, spec.model.flavor)
    assert cfg.model.hf_assets_path == "/tmp/runs/tiny-mup/data"
    opt = cfg.optimizer
    assert (opt.name, opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (
        "adamw", spec.optimizer.lr, 0.9, 0.95, spec.optimizer.eps, 0.0)
    assert opt.nus == (0.7, 1.0) and opt.implementation == "foreach"
    t = cfg.training
    assert (t.steps, t.local_batch_size, t.global_batch_size, t.seq_len) == (50, 8, -1, 128)
    assert t.max_norm == 1.0 and t.dtype == "float32" and t.mixed_precision_param == "float32"
    assert (cfg.lr_scheduler.warmup_steps, cfg.lr_scheduler.decay_ratio) == (0, None)
    assert cfg.lr_scheduler.decay_type == "linear" and cfg.lr_scheduler.min_lr_factor == 0.0
    p = cfg.parallelism
    assert (p.data_parallel_shard_degree, p.data_parallel_replicate_degree,
            p.tensor_parallel_degree) == (-1, 1, 1)
    assert cfg.checkpoint.enable is False and cfg.checkpoint.folder == "checkpoints"
    assert cfg.activation_checkpoint.mode == "none" and cfg.compile.enable is False
    assert cfg.metrics.log_freq == 1 and not cfg.metrics.enable_tensorboard
    assert (cfg.debug.seed, cfg.debug.deterministic) == (0, False)
    assert cfg.validation.enable is False
    assert cfg.experimental.custom_import == ""  # registered from Python, see train_spec


def test_every_spec_field_that_torchtitan_reads_is_carried() -> None:
    spec = make_spec(
        optimizer={"name": "qhadopt", "lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-6,
                   "weight_decay": 1e-4, "nus": [0.6, 1.0], "implementation": "single_tensor",
                   "grad_clip_norm": None},
        schedule={"warmup_steps": 7, "decay_type": "cosine", "decay_ratio": 0.2,
                  "min_lr_factor": 0.1},
        training={"steps": 11, "local_batch_size": 2, "global_batch_size": 8, "seq_len": 64,
                  "dtype": "bfloat16", "compile": True, "activation_checkpoint": "full",
                  "seed": 5, "deterministic": True, "log_interval": 3,
                  "validation_interval": 4, "validation_batches": 3},
        parallelism={"data_parallel_shard_degree": 2, "data_parallel_replicate_degree": 2},
        checkpoint={"uri": "s3://bucket/ckpt", "interval_steps": 20, "async_save": True},
        model={"flavor": "7.61M"},
    )
    cfg = build_job_config(spec, "cuda")
    assert cfg.model.flavor == "7.61M"
    opt = cfg.optimizer
    assert (opt.name, opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.nus) == (
        "qhadopt", 1e-3, 0.8, 0.99, 1e-6, 1e-4, (0.6, 1.0))
    assert opt.implementation == "for-loop"
    assert math.isinf(cfg.training.max_norm)  # no clipping; the norm is still logged
    s = cfg.lr_scheduler
    assert (s.warmup_steps, s.decay_type, s.decay_ratio, s.min_lr_factor) == (7, "cosine", 0.2, 0.1)
    t = cfg.training
    assert (t.steps, t.local_batch_size, t.global_batch_size, t.seq_len) == (11, 2, 8, 64)
    assert t.mixed_precision_param == "bfloat16" and t.dtype == "float32"
    assert cfg.compile.enable and cfg.activation_checkpoint.mode == "full"
    assert (cfg.debug.seed, cfg.debug.deterministic, cfg.metrics.log_freq) == (5, True, 3)
    assert (cfg.parallelism.data_parallel_shard_degree,
            cfg.parallelism.data_parallel_replicate_degree) == (2, 2)
    c = cfg.checkpoint
    assert (c.enable, c.folder, c.interval, c.async_mode, c.last_save_model_only) == (
        False, "s3://bucket/ckpt", 20, "async", False)
    v = cfg.validation  # torchtitan builds fljob's validator from it (train_spec)
    assert (v.enable, v.freq, v.steps, v.local_batch_size, v.seq_len) == (True, 4, 3, 2, 64)


def test_flight_recorder_only_on_gpu() -> None:
    spec = make_spec()
    assert build_job_config(spec, "cpu").comm.trace_buf_size == 0
    assert build_job_config(spec, "cuda").comm.trace_buf_size > 0


def test_spec_round_trips_through_the_config() -> None:
    spec = make_spec(optimizer={"name": "adopt"}, training={"steps": 3})
    cfg = build_job_config(spec, "cpu")
    assert isinstance(cfg, FljobJobConfig)
    assert job_spec(cfg) == spec


def test_job_spec_rejects_a_foreign_config() -> None:
    from torchtitan.config import JobConfig

    with pytest.raises(TypeError):
        job_spec(JobConfig())


def test_config_is_plain_data_and_byte_stable() -> None:
    spec = make_spec(optimizer={"name": "qhadamw"})
    first = json.dumps(build_job_config(spec, "cpu").to_dict(), indent=2)
    second = json.dumps(dataclasses.asdict(build_job_config(spec, "cpu")), indent=2)
    assert first == second


def test_auto_optimizer_implementation_is_fused_on_cuda_only() -> None:
    spec = make_spec()
    assert spec.optimizer.implementation == "auto"
    assert build_job_config(spec, "cuda").optimizer.implementation == "fused"
    assert build_job_config(spec, "cpu").optimizer.implementation == "foreach"


def test_checkpoint_section_async_only_on_cuda() -> None:
    """fljob's checkpointer reads this section; DCP's thread-based async save only pays off
    where staging copies device memory to the host."""
    spec = make_spec(checkpoint={"uri": "s3://b/run", "interval_steps": 7, "keep_latest": 1,
                                 "async_save": True})
    cpu, cuda = build_job_config(spec, "cpu").checkpoint, build_job_config(spec, "cuda").checkpoint
    assert (cpu.async_mode, cuda.async_mode) == ("disabled", "async")
    assert (cpu.folder, cpu.interval, cpu.keep_latest_k, cpu.load_step) == ("s3://b/run", 7, 1, -1)
    assert cpu.last_save_model_only is False  # the final save must resume training
