"""A sweep's trials: the spec around the `sweep:` block, once for each combination of the grid.

Every trial is a complete, validated JobSpec (the base with the trial's overrides, a name from
``sweep.name_format``, a run folder and checkpoint URI of its own under the sweep's), so
everything that works on a job works on a trial, and a bad value in any trial is found before
anything is queued. The backends render the trials (one SLURM array, one PyTorchJob each,
local processes) and write :func:`sweep_index` beside them, which ``fljob status`` and
``fljob sweep report`` read.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fljob.spec.loader import (
    Problem,
    SpecError,
    apply_override,
    parse_override,
    validation_problems,
)
from fljob.spec.models import DERIVED_NAME_SUFFIXES, DNS1035, JobSpec, TrialInfo, grid_field_aliases

SWEEP_INDEX_FILE = "sweep.json"
MAX_REPORTED_TRIALS = 10
"""Trials whose problems are listed in full; the rest are counted."""


@dataclass(frozen=True)
class Trial:
    index: int
    overrides: dict[str, Any]
    spec: JobSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_dir(self) -> str:
        return self.spec.resolved_run_dir


def _label_text(value: Any) -> str:
    """A grid value as part of a DNS-1035 label: 0.001 -> '0-001', 3e-3 -> '3e-3', True -> 'true'."""
    text = str(value).lower()
    return re.sub(r"[^a-z0-9-]+", "-", text).strip("-")


def trial_name(spec: JobSpec, index: int, overrides: dict[str, Any]) -> str:
    assert spec.sweep is not None
    aliases = grid_field_aliases(list(spec.sweep.grid))
    fields = {alias: _label_text(overrides[key]) for alias, key in aliases.items()}
    return spec.sweep.name_format.format(name=spec.name, index=index, **fields)


def combinations(spec: JobSpec) -> list[dict[str, Any]]:
    """The grid's combinations as override maps, in trial order (the last key varies fastest)."""
    assert spec.sweep is not None
    keys = list(spec.sweep.grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.sweep.grid.values())]


def expand(spec: JobSpec) -> list[Trial]:
    """Every trial of ``spec``'s sweep, validated; SpecError lists what is wrong, by trial."""
    if spec.sweep is None:
        raise ValueError("expand() needs a spec with a sweep: block")
    if spec._trials is None:
        spec._trials = _expand(spec)
    return list(spec._trials)


def _expand(spec: JobSpec) -> list[Trial]:
    assert spec.sweep is not None
    base = spec.model_dump(mode="json", exclude={"sweep"})
    grid_origins = {key: spec.origin(f"sweep.grid.{key}") for key in spec.sweep.grid}
    trials: list[Trial] = []
    problems: list[Problem] = []
    failed = 0
    names: dict[str, int] = {}
    count = spec.sweep.size
    longest_suffix = max(DERIVED_NAME_SUFFIXES, key=len)
    for index, overrides in enumerate(combinations(spec)):
        found: list[Problem] = []
        name = trial_name(spec, index, overrides)
        label = f"trial {index} ({', '.join(f'{k}={v}' for k, v in overrides.items())})"
        if not DNS1035.match(name) or len(name) + len(longest_suffix) > 63:
            found.append(Problem(spec.origin("sweep.name_format"), "sweep.name_format",
                                 f"{label}: the name {name!r} is not a DNS-1035 label of at most "
                                 f"{63 - len(longest_suffix)} characters; shorten the format or the "
                                 "job name"))
        elif name in names:
            found.append(Problem(spec.origin("sweep.name_format"), "sweep.name_format",
                                 f"{label}: the name {name!r} is also trial {names[name]}'s; "
                                 "add {index} to the format"))
        names.setdefault(name, index)
        data = _trial_data(base, spec, name, index, count, overrides)
        try:
            trial_spec = JobSpec.model_validate(data)
        except ValidationError as exc:
            def origin_of(loc: tuple[str | int, ...], overrides: dict[str, Any] = overrides) -> str:
                field = ".".join(str(part) for part in loc)
                key = next((k for k in overrides if field == k or field.startswith(f"{k}.")), None)
                return grid_origins[key] if key else spec.origin(field)

            found += validation_problems(exc, origin_of, prefix=f"{label}: ")
        else:
            trial_spec._origins = {**spec._origins, **{k: grid_origins[k] for k in overrides}}
            if not found:
                trials.append(Trial(index, overrides, trial_spec))
        if found:
            failed += 1
            if failed <= MAX_REPORTED_TRIALS:
                problems += found
    if failed > MAX_REPORTED_TRIALS:
        problems.append(Problem(spec.origin("sweep"), "sweep",
                                f"{failed - MAX_REPORTED_TRIALS} more trials have problems"))
    if problems:
        raise SpecError(spec.origin(), problems)
    return trials


def _trial_data(base: dict[str, Any], spec: JobSpec, name: str, index: int, count: int,
                overrides: dict[str, Any]) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(base)
    for key, value in overrides.items():
        loc, _ = parse_override(f"{key}=")
        apply_override(data, loc, copy.deepcopy(value), f"sweep.grid.{key}")
    data["name"] = name
    data["run_dir"] = f"{spec.resolved_run_dir}/{name}"
    if spec.checkpoint.uri:
        data["checkpoint"]["uri"] = f"{spec.checkpoint.uri.rstrip('/')}/{name}"
    data["trial"] = TrialInfo(sweep=spec.name, index=index, count=count, overrides=overrides).model_dump(mode="json")
    return data


def sweep_index(spec: JobSpec, trials: list[Trial]) -> dict[str, Any]:
    """What `fljob status` and `fljob sweep report` read beside the trials (``sweep.json``)."""
    assert spec.sweep is not None
    return {
        "sweep": spec.name,
        "count": len(trials),
        "parallel": spec.sweep.parallel,
        "grid": spec.sweep.grid,
        "trials": [{"index": t.index, "name": t.name, "run_dir": t.run_dir, "overrides": t.overrides}
                   for t in trials],
    }
