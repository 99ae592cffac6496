"""What every backend shares: rendered files, backend-specific spec checks, job handles.

A backend is a pure ``render(spec) -> [RenderedFile]`` plus thin I/O (submit, status, logs,
cancel) around the rendered artifact; ``fljob render`` shows exactly what ``fljob submit``
would send.
"""

from __future__ import annotations

import enum
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from fljob import __version__
from fljob.errors import UsageError, elide
from fljob.files import OutFile, write_files
from fljob.spec import JobSpec, Problem, SpecError, problem_at
from fljob.spec.models import SecretRef
from fljob.spec.sweep import Trial, expand

# What the job's processes run: the trainer, or the distributed preflight that only joins the
# process group and all-reduces (proves the allocation and rendezvous before spending GPU hours).
Task = Literal["train", "doctor"]
TASK_ARGV: dict[Task, tuple[str, ...]] = {"train": ("train",), "doctor": ("doctor", "--distributed")}

SPEC_FILE = "spec.yaml"
GENERATED_BY = f"Rendered by fljob {__version__}; do not edit: change the spec and render again."


@dataclass(frozen=True)
class RenderedFile:
    name: str
    content: str
    executable: bool = False

    def write(self, folder: Path) -> Path:
        """Write atomically (temp file + rename) so a failed render never leaves half a file."""
        return write_files(folder, [self.as_out_file()])[0]

    def as_out_file(self) -> OutFile:
        return OutFile(self.name, self.content, 0o755 if self.executable else 0o644)


def write_rendered(folder: Path, files: list[RenderedFile] | tuple[RenderedFile, ...]) -> list[Path]:
    """Every rendered file into ``folder``, or none of them (fljob.files.write_files)."""
    return write_files(folder, [f.as_out_file() for f in files])


def shell_join(argv: list[str] | tuple[str, ...]) -> str:
    """Quote every word: no value can change what the shell runs."""
    return " ".join(shlex.quote(a) for a in argv)


BACKEND_NAMES = ("local", "slurm", "k8s")
"""The --backend names and handle schemes; fljob.backends.get() maps each to its module."""


@dataclass(frozen=True)
class Handle:
    """A submitted job or sweep: slurm://<jobid>, k8s://<namespace>/<name> or local://<run dir>."""

    backend: str
    ident: str

    def __str__(self) -> str:
        return f"{self.backend}://{self.ident}"

    @classmethod
    def parse(cls, text: str) -> Handle:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in BACKEND_NAMES or not rest:
            raise UsageError(
                f"{elide(text)!r} is not a job handle; use slurm://<jobid>, k8s://<namespace>/<name> "
                "or local://<run dir> (fljob submit prints it)"
            )
        if scheme == "slurm" and not rest.replace("_", "").isdigit():
            raise UsageError(f"{elide(text)!r}: a SLURM handle is slurm://<numeric job id>")
        if scheme == "k8s" and not (rest.count("/") == 1 or rest.count("/") == 2 and rest.split("/")[1] == "trainjob"):
            raise UsageError(f"{elide(text)!r}: a Kubernetes handle is k8s://<namespace>/<name> (a PyTorchJob) or "
                             "k8s://<namespace>/trainjob/<name> (a TrainJob)")
        return cls(scheme, rest)


class JobState(enum.StrEnum):
    """Where a job is, the same words for every backend (each maps its native states)."""

    PENDING = "PENDING"  # accepted, waiting for resources (or a queue's admission)
    RUNNING = "RUNNING"
    REQUEUED = "REQUEUED"  # checkpointed and waiting to run again (preemption, time limit)
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"  # stopped after a checkpoint with no retry left: submit again to resume
    DIVERGED = "DIVERGED"  # stopped because the loss became NaN/inf (nothing bad was committed)
    UNKNOWN = "UNKNOWN"

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED,
                    JobState.DIVERGED})


@dataclass(frozen=True)
class JobStatus:
    """What `fljob status` shows of one job (or one trial of a sweep)."""

    handle: str
    state: JobState
    native: str = ""  # the backend's own word for it: SLURM's TIMEOUT, the operator's reason
    exit_code: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    validation_loss: float | None = None
    logs: str | None = None  # where the job's output is (a path, or the command that shows it)
    details: tuple[tuple[str, str], ...] = ()  # more key=value facts: restarts, elapsed, reason
    name: str | None = None  # a sweep trial's name

    def to_json(self) -> dict[str, Any]:
        out = {"handle": self.handle, "state": self.state.value, "native": self.native,
               "exit_code": self.exit_code, "step": self.step, "steps": self.steps,
               "loss": _json_float(self.loss), "validation_loss": _json_float(self.validation_loss),
               "logs": self.logs, **dict(self.details)}
        return out if self.name is None else {"name": self.name, **out}

    def line(self) -> str:
        """``<handle> <STATE> key=value ...``: the same fields, in the same order, everywhere."""
        facts: list[tuple[str, str]] = []
        if self.native and self.native != self.state.value:
            facts.append(("native", self.native))
        if self.exit_code is not None:
            facts.append(("exit_code", str(self.exit_code)))
        if self.step is not None:
            facts.append(("step", f"{self.step}/{self.steps}" if self.steps else str(self.step)))
        if self.loss is not None:
            facts.append(("loss", f"{self.loss:.4f}"))
        if self.validation_loss is not None:
            facts.append(("validation_loss", f"{self.validation_loss:.4f}"))
        facts += self.details
        if self.logs:
            facts.append(("logs", self.logs))
        return " ".join([self.handle, self.state.value, *(f"{k}={_quote(v)}" for k, v in facts)])


@dataclass(frozen=True)
class SweepStatus:
    """A sweep: its handle and one JobStatus per trial, in trial order."""

    handle: str
    sweep: str
    trials: tuple[JobStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return {"handle": self.handle, "sweep": self.sweep, "counts": self.counts(),
                "trials": [t.to_json() for t in self.trials]}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        return counts

    def line(self) -> str:
        """A head line, then a table of trials (state, step, losses, exit code)."""
        summary = ", ".join(f"{n} {state}" for state, n in self.counts().items())
        head = f"{self.handle} SWEEP {self.sweep}: {len(self.trials)} trials: {summary}"
        rows = [("trial", "name", "state", "step", "loss", "val_loss", "exit", "logs")]
        for i, t in enumerate(self.trials):
            rows.append((str(i), t.name or "", t.state.value,
                         "" if t.step is None else f"{t.step}/{t.steps}" if t.steps else str(t.step),
                         "" if t.loss is None else f"{t.loss:.4f}",
                         "" if t.validation_loss is None else f"{t.validation_loss:.4f}",
                         "" if t.exit_code is None else str(t.exit_code), t.logs or ""))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        table = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join([head, *table])


def _json_float(value: float | None) -> float | str | None:
    return str(value) if value is not None and not math.isfinite(value) else value


def _quote(value: str) -> str:
    return shlex.quote(value) if value and not re.fullmatch(r"[\w@%+=:,./-]+", value) else value or "''"


@dataclass(frozen=True)
class Submission:
    """The dry run: exactly what `submit` writes and runs, computed without side effects."""

    backend: str
    folder: Path  # absolute: where the files go
    files: tuple[RenderedFile, ...]  # names relative to folder; a sweep's trials in subfolders
    command: str  # what submit runs once the files are written, as a person would type it
    spec: JobSpec
    task: Task = "train"
    handle: Handle | None = None  # known before submitting (local, k8s), or assigned by the cluster
    trials: tuple[Trial, ...] = ()  # a sweep's, in trial order

    def describe(self) -> str:
        lines = [f"fljob submit --dry-run ({self.backend}): nothing written, nothing run.",
                 f"would write into {self.folder}:"]
        lines += [f"  {f.name}" for f in self.files]
        lines.append(f"then run: {self.command}")
        if self.handle is not None:
            lines.append(f"handle: {self.handle}")
        return "\n".join(lines)

    def write(self) -> list[Path]:
        return write_rendered(self.folder, self.files)


@runtime_checkable
class Backend(Protocol):
    """The contract every backend module keeps (fljob.backends.local, .slurm, .kubernetes).

    ``check`` and ``render`` are pure (no I/O, no cluster); ``plan`` is the dry run, built
    from ``render``; ``submit`` writes the plan's files and hands them to the cluster, and the
    rest is thin I/O keyed by the handle ``submit`` returns. A spec with a ``sweep:`` block
    renders and submits as a whole sweep, and its handle's status lists the trials.
    """

    NAME: str

    def check(self, spec: JobSpec) -> None:
        """Raise SpecError naming every field this backend cannot run (render would fail)."""

    def render(self, spec: JobSpec, task: Task = "train") -> list[RenderedFile]:
        """The exact artifacts a submit sends, as text."""

    def plan(self, spec: JobSpec, task: Task = "train") -> Submission:
        """The dry run: the files, where they go and the command that submits them."""

    def submit(self, plan: Submission) -> Handle:
        """Write the plan's files and submit them; the handle for status, logs and cancel."""

    def status(self, handle: Handle) -> JobStatus | SweepStatus: ...

    def logs(self, handle: Handle, follow: bool = False) -> Iterator[str]: ...

    def cancel(self, handle: Handle) -> None: ...

    def doctor_checks(self, spec: JobSpec | None) -> Iterator[Any]:
        """The preflight checks of `fljob doctor` for this backend (fljob.doctor.Check each)."""


WANDB_KEY_ENV = "WANDB_API_KEY"


def secret_refs(spec: JobSpec) -> dict[str, SecretRef]:
    """Every variable the job sets from a secret reference: storage credentials, the W&B key and
    secret_env."""
    wandb = spec.metrics.wandb
    key = {WANDB_KEY_ENV: wandb.api_key} if wandb is not None and wandb.api_key is not None else {}
    return {**spec.storage.credential_refs(), **key, **spec.secret_env}


def secret_field(spec: JobSpec, target: str) -> str:
    """The spec field that declares the secret reference for environment variable `target`."""
    if target in spec.secret_env:
        return f"secret_env.{target}"
    if target == WANDB_KEY_ENV:
        return "metrics.wandb.api_key"
    names = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key",
             "AWS_SESSION_TOKEN": "session_token"}
    return f"storage.{names[target]}"


# Variables that torchrun, the Kubeflow operator, SLURM or fljob itself set to start the job
# (rendezvous, ranks, which spec the trainer reads), and those through which a shell, the
# dynamic loader or Python would run other code than fljob's: a spec that set them would
# change what runs.
RESERVED_ENV = frozenset({
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
    "PATH", "BASH_ENV", "ENV", "IFS", "CDPATH", "GLOBIGNORE", "SHELLOPTS", "BASHOPTS", "PS4",
    "PROMPT_COMMAND", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
})
RESERVED_ENV_PREFIXES = ("FLJOB_", "PET_", "TORCHELASTIC_", "SLURM_", "LD_", "BASH_FUNC_")


def reserved_env_fields(spec: JobSpec) -> list[str]:
    """Spec fields (`env.X`, `secret_env.X`) that would override a variable the launch relies on."""
    return [f"{section}.{name}"
            for section, names in (("env", spec.env), ("secret_env", spec.secret_env))
            for name in sorted(names)
            if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)]


def launch_problems(spec: JobSpec) -> list[Problem]:
    """What no backend can launch safely: reserved environment names (see RESERVED_ENV)."""
    return [problem_at(spec, field, "is set by the launcher, the cluster or fljob itself, or changes "
                       "which program runs (shell, loader and Python search paths); remove it.")
            for field in reserved_env_fields(spec)]


def check_job_or_sweep(spec: JobSpec, job_problems: Callable[[JobSpec], list[Problem]]) -> None:
    """Raise SpecError with every problem ``job_problems`` finds in the job, or in each trial
    of its sweep (each problem once, however many trials share it)."""
    problems = list(dict.fromkeys(p for s in jobs_of(spec) for p in [*launch_problems(s), *job_problems(s)]))
    if problems:
        raise SpecError(spec.origin(), problems)


def jobs_of(spec: JobSpec) -> list[JobSpec]:
    """The job itself, or its sweep's trials."""
    return [t.spec for t in expand(spec)] if spec.sweep is not None else [spec]


def put_this_fljob_on_path() -> None:
    """Make jobs started from here find this installation's `fljob` first on PATH.

    A job's script calls `fljob launch`; when fljob runs from a virtual environment that is
    not activated (`.venv/bin/fljob submit ...`), that name would otherwise be missing or
    another installation's. SLURM jobs inherit the submitter's environment, local runs too.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


# --------------------------------------------------------------------------- a run folder's progress


@dataclass(frozen=True)
class RunProgress:
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    validation_loss: float | None = None
    diverged: bool = False


METRICS_TAIL_BYTES = 1 << 16


def run_progress(run_dir: Path) -> RunProgress:
    """Step and losses of a run from its folder: summary.json when written, else the last
    records of metrics.jsonl; the planned steps from the spec beside them. Never raises."""
    from fljob.summary import read_summary

    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):
        summary = None
    if summary is not None:
        return RunProgress(summary.step, summary.steps, summary.train_loss, summary.validation_loss,
                           summary.diverged)
    step = loss = validation = None
    for record in reversed(_tail_records(run_dir / "metrics.jsonl")):
        if step is None and isinstance(record.get("step"), int):
            step = record["step"]
        if loss is None and "loss" in record:
            loss = _as_float(record["loss"])
        if validation is None and "validation_loss" in record:
            validation = _as_float(record["validation_loss"])
    return RunProgress(step, _planned_steps(run_dir), loss, validation)


def _tail_records(path: Path) -> list[dict[str, Any]]:
    import json

    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - METRICS_TAIL_BYTES)
            f.seek(start)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    if start:  # the first line read is probably cut
        lines = lines[1:]
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _planned_steps(run_dir: Path) -> int | None:
    import yaml

    try:
        data = yaml.safe_load((run_dir / SPEC_FILE).read_text(encoding="utf-8"))
        steps = data["training"]["steps"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None
