"""What a checkpoint depends on, and whether a run with a changed spec may resume it.

Every step's manifest carries a *compatibility record*: the settings that give the saved
state its meaning. Resuming compares it with the current run's record (:func:`compare`, a
pure function) and sorts every difference between the saved and the current resolved spec
into one of three kinds:

incompatible (refused, exit 2)
    ``model.flavor`` (resolved: ``tiny`` is its registered name), ``model.width`` and
    ``model.depth`` (resolved: the built model's dim and block count), ``model.mup``,
    ``model.tie_embeddings``, ``model.attention_scale``, ``model.embedding_norm`` and
    ``model.peri_norm`` (resolved: whether the built model has them), the muP multipliers
    ``model.input_alpha``/``output_alpha``/``depth_alpha_exp``, ``optimizer.name`` and the
    tokenizer's vocabulary size. Shape changes would fail deep inside DCP; the rest would
    load silently and train on state that means something else (every fljob optimizer keeps
    ``exp_avg``/``exp_avg_sq``/``step``, so AdamW's state loads into ADOPT without a
    complaint, and weights trained under one parametrisation compute another function
    under another).
kept from the checkpoint (allowed, warned)
    ``optimizer.lr``, ``betas``, ``eps``, ``weight_decay`` and ``nus`` live in the
    optimizer's parameter groups and the LR scheduler's base rates, which the checkpoint
    restores: the new value has no effect on a resumed run. ``model.init_std`` and
    ``model.zero_init_readout``/``zero_init_query`` only initialise a fresh model.
applied (allowed, logged)
    everything else: ``training.steps`` (the decay follows the new length), schedule,
    logging, metrics, validation, checkpoint interval and retention, gradient clipping,
    batch sizes and seq_len (the data position is a global sample count), data settings,
    the optimizer's update path and the device (re-applied after loading, see the manager),
    resources and parallelism. No parallelism setting changes the saved layout: DCP
    reshards model and optimizer tensors to the new mesh on load, and the data position is
    the same on every data-parallel rank.

A checkpoint written before records existed (no ``compatibility`` in its manifest) cannot be
checked: resuming goes on with a warning that says so, as such runs always did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from fljob.spec.models import JobSpec
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import flavor_name

VOCAB_SIZE = "vocab_size"
"""Not a spec field: the run's tokenizer decides it (``data.tokenizer`` or the bundled one)."""

KEPT_FROM_CHECKPOINT = frozenset({"optimizer.lr", "optimizer.betas", "optimizer.eps",
                                  "optimizer.weight_decay", "optimizer.nus", "model.init_std",
                                  "model.zero_init_readout", "model.zero_init_query"})
"""Spec fields whose new value a resumed run does not use (see the module docstring)."""

UNSHOWN_VALUES = ("env.", "secret_env.", "storage.")
"""Spec paths whose values are not logged (a plain env value may still be sensitive)."""


def compatibility_record(spec: JobSpec, model_args: ModelArgs) -> dict[str, Any]:
    """The record a step's manifest carries: the built model's shape and parametrisation,
    keyed by the spec field a user changes (``vocab_size`` is the tokenizer's)."""
    return {
        "model.flavor": flavor_name(spec),
        "model.width": model_args.dim,
        "model.depth": model_args.n_layers,
        "model.mup": model_args.mup_enabled,
        "model.tie_embeddings": model_args.tie_word_embeddings,
        "model.attention_scale": model_args.attn_scaling,
        "model.input_alpha": model_args.input_alpha,
        "model.output_alpha": model_args.output_alpha,
        "model.depth_alpha_exp": model_args.depth_alpha,
        "model.embedding_norm": model_args.use_embedding_norm,
        "model.peri_norm": model_args.use_peri_norm,
        "optimizer.name": spec.optimizer.name,
        VOCAB_SIZE: model_args.vocab_size,
    }


@dataclass(frozen=True)
class Change:
    field: str
    before: Any
    after: Any

    def __str__(self) -> str:
        if self.field.startswith(UNSHOWN_VALUES):
            return self.field
        return f"{self.field} {self.before!r} -> {self.after!r}"


@dataclass(frozen=True)
class Comparison:
    """The differences between a saved step and the current run, by kind."""

    incompatible: tuple[Change, ...] = ()
    kept: tuple[Change, ...] = ()
    applied: tuple[Change, ...] = ()
    unrecorded: tuple[str, ...] = ()  # record fields the checkpoint does not carry

    def refusal(self, step_uri: str) -> str:
        """The one-line reason a resume of ``step_uri`` is refused."""
        changes = ", ".join(map(str, self.incompatible))
        return (f"cannot resume {step_uri}: the spec changed what the checkpoint depends on "
                f"({changes}); set the checkpoint's values again to resume it, or start fresh "
                "with another checkpoint.uri (or another run_dir when checkpoint.uri is unset)")


def compare(manifest: Mapping[str, Any], record: Mapping[str, Any],
            spec_yaml: str) -> Comparison:
    """Compare a saved step (its ``manifest``) with the current run (its compatibility
    ``record`` and resolved spec as :func:`fljob.spec.loader.dump_spec` writes it)."""
    saved = manifest.get("compatibility")
    saved = saved if isinstance(saved, Mapping) else {}
    incompatible = tuple(Change(k, saved[k], v) for k, v in record.items()
                         if k in saved and saved[k] != v)
    unrecorded = tuple(k for k in record if k not in saved)
    before = _flatten(_load(manifest.get("spec")))  # empty when the manifest has none
    after = _flatten(_load(spec_yaml)) if before else {}
    changed = [Change(k, before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k) and k not in record]
    return Comparison(
        incompatible=incompatible,
        kept=tuple(c for c in changed if c.field in KEPT_FROM_CHECKPOINT),
        applied=tuple(c for c in changed if c.field not in KEPT_FROM_CHECKPOINT),
        unrecorded=unrecorded,
    )


def _load(spec_yaml: object) -> Any:
    if not isinstance(spec_yaml, str):
        return {}
    try:
        return yaml.safe_load(spec_yaml)
    except yaml.YAMLError:
        return {}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(data, Mapping):
        return {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
