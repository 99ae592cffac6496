"""For every backend: what `fljob validate --backend X` accepts, the trainer accepts.

A property over generated model, optimizer, schedule and training fields (values at and beyond
the edges of what the pieces take): whenever the spec loads and the backend's check passes,
the trainer's own checks pass too: the model arguments validate and the model builds, the muP
parameter groups and the optimizer build (and take a step), torchtitan's JobConfig and LR
schedule build. A spec the trainer would reject after queueing must be refused before.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torchtitan")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchtitan.components.lr_scheduler import build_lr_schedulers

from fljob import backends
from fljob.spec import JobSpec, SpecError
from fljob.trainer.job_config import build_job_config
from fljob.trainer.model.flavors import args_for_spec, flavor_name, get_flavor
from fljob.trainer.model.model import MuPTransformer
from fljob.trainer.train_spec import build_mup_optimizers

UNIT = st.floats(-0.1, 1.2, allow_nan=False)
POSITIVE = st.one_of(st.floats(1e-9, 10.0), st.sampled_from([0.0, -1e-3, 1e-12]))
# The trainer is built on this CPU, so every spec says device cpu (under "auto" the spec rightly
# accepts the CUDA-only fused optimizer, which this machine cannot build).
FIELDS = st.fixed_dictionaries({
    "training": st.fixed_dictionaries({"device": st.just("cpu")}, optional={
        "steps": st.integers(0, 12), "seq_len": st.integers(4, 96), "local_batch_size": st.integers(0, 4),
        "validation_interval": st.one_of(st.none(), st.integers(0, 5))}),
}, optional={
    "optimizer": st.fixed_dictionaries({}, optional={
        "name": st.sampled_from(["adopt", "qhadamw", "qhadopt", "decoupled_adamw", "adamw"]),
        "lr": POSITIVE, "eps": POSITIVE, "weight_decay": st.floats(-0.1, 1.0, allow_nan=False),
        "betas": st.tuples(UNIT, UNIT), "nus": st.tuples(UNIT, UNIT),
        "implementation": st.sampled_from(["auto", "foreach", "single_tensor", "fused"]),
        "grad_clip_norm": st.one_of(st.none(), POSITIVE)}),
    "model": st.fixed_dictionaries({}, optional={
        "mup": st.booleans(), "attention_scale": st.sampled_from(["mup", "standard"]),
        "input_alpha": POSITIVE, "output_alpha": POSITIVE, "depth_alpha_exp": UNIT, "init_std": POSITIVE,
        "tie_embeddings": st.booleans(), "zero_init_readout": st.booleans(),
        "zero_init_query": st.booleans(), "width": st.sampled_from([8, 16, 24, 32, 48, 64, 96, 100, 128]),
        "depth": st.integers(0, 6)}),
    "schedule": st.fixed_dictionaries({}, optional={
        "warmup_steps": st.integers(-1, 12), "decay_type": st.sampled_from(["linear", "sqrt", "cosine"]),
        "decay_ratio": st.one_of(st.none(), UNIT), "min_lr_factor": UNIT}),
})


def trainer_accepts(spec: JobSpec) -> None:
    """What the trainer builds from a spec before its first step, on one CPU process."""
    args = args_for_spec(spec, vocab_size=get_flavor(flavor_name(spec)).vocab_size)
    args.validate()
    model = MuPTransformer(args)
    model.init_weights()
    job_config = build_job_config(spec, "cpu")
    optimizers = build_mup_optimizers([model], job_config.optimizer, parallel_dims=None)
    build_lr_schedulers(optimizers, job_config.lr_scheduler, job_config.training.steps)
    tokens = torch.randint(0, args.vocab_size, (1, min(spec.training.seq_len, 16)))
    model(tokens).float().square().mean().backward()
    optimizers.step()


@pytest.mark.parametrize("backend", ["local", "slurm", "k8s"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=FIELDS)
def test_validate_accepts_implies_the_trainer_accepts(backend: str, fields: dict[str, Any]) -> None:
    try:
        spec = JobSpec.model_validate({"name": "prop", "image": "localhost/fljob:dev", **fields})
        backends.get(backend).check(spec)
    except (SpecError, ValueError):  # pydantic's ValidationError is a ValueError: refused up front
        return
    trainer_accepts(spec)
