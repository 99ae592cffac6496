"""What every backend shares: rendered files, backend-specific spec checks, job handles.

A backend is a pure ``render(spec) -> [RenderedFile]`` plus thin I/O (submit, status, logs,
cancel) around the rendered artifact; ``fljob render`` shows exactly what ``fljob submit``
would send.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fljob import __version__
from fljob.errors import UsageError
from fljob.spec import JobSpec
from fljob.spec.models import SecretRef

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
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.content, encoding="utf-8")
        tmp.chmod(0o755 if self.executable else 0o644)
        tmp.replace(path)
        return path


def shell_join(argv: list[str] | tuple[str, ...]) -> str:
    """Quote every word: no value can change what the shell runs."""
    return " ".join(shlex.quote(a) for a in argv)


@dataclass(frozen=True)
class Handle:
    """A submitted job: slurm://<jobid>, k8s://<namespace>/<name> or local://<run dir>."""

    backend: Literal["slurm", "k8s", "local"]
    ident: str

    def __str__(self) -> str:
        return f"{self.backend}://{self.ident}"

    @classmethod
    def parse(cls, text: str) -> Handle:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("slurm", "k8s", "local") or not rest:
            raise UsageError(
                f"{text!r} is not a job handle; use slurm://<jobid>, k8s://<namespace>/<name> "
                "or local://<run dir> (fljob submit prints it)"
            )
        if scheme == "slurm" and not rest.replace("_", "").isdigit():
            raise UsageError(f"{text!r}: a SLURM handle is slurm://<numeric job id>")
        if scheme == "k8s" and rest.count("/") != 1:
            raise UsageError(f"{text!r}: a Kubernetes handle is k8s://<namespace>/<name>")
        return cls(scheme, rest)  # type: ignore[arg-type]


def secret_refs(spec: JobSpec) -> dict[str, SecretRef]:
    """Every variable the job sets from a secret reference: storage credentials and secret_env."""
    return {**spec.storage.credential_refs(), **spec.secret_env}


def secret_field(spec: JobSpec, target: str) -> str:
    """The spec field that declares the secret reference for environment variable `target`."""
    if target in spec.secret_env:
        return f"secret_env.{target}"
    names = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key",
             "AWS_SESSION_TOKEN": "session_token"}
    return f"storage.{names[target]}"


# Variables that torchrun, the Kubeflow operator, SLURM or fljob itself set to start the job
# (rendezvous, ranks, which spec the trainer reads): a spec that set them would change what runs.
RESERVED_ENV = frozenset({"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                          "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK"})
RESERVED_ENV_PREFIXES = ("FLJOB_", "PET_", "TORCHELASTIC_", "SLURM_")


def reserved_env_fields(spec: JobSpec) -> list[str]:
    """Spec fields (`env.X`, `secret_env.X`) that would override a variable the launch relies on."""
    return [f"{section}.{name}"
            for section, names in (("env", spec.env), ("secret_env", spec.secret_env))
            for name in sorted(names)
            if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)]


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
