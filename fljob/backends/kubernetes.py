"""Thin kubectl I/O around the Kubernetes renderer: submit, status, logs, cancel.

Every kubectl command line is built by a pure function (tested as exact argv lists); running
them is the only I/O here. A kubectl failure (no cluster, no permission, no training operator)
becomes a UsageError that quotes the command and kubectl's own words, so the CLI exits 2 with
a message instead of a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fljob.backends import k8s_schema, kubernetes_render
from fljob.backends.base import Handle, Task, shell_join
from fljob.errors import UsageError
from fljob.spec import JobSpec

KUBECTL = "kubectl"
# One tab-separated line per status condition, oldest first (the operator appends).
CONDITIONS_JSONPATH = '{range .status.conditions[*]}{.type}{"\\t"}{.status}{"\\t"}{.reason}{"\\t"}{.message}{"\\n"}{end}'


class KubectlError(UsageError):
    """kubectl failed; the message carries the command line and what kubectl said."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        said = "\n".join(f"  {line}" for line in stderr.strip().splitlines()[-3:]) or "  (no output)"
        super().__init__(
            f"`{shell_join(argv)}` failed with exit code {returncode}:\n{said}\n"
            "Check that kubectl reaches your cluster (kubectl config current-context; kubectl cluster-info) "
            "and that the Kubeflow training operator is installed (kubectl get crd pytorchjobs.kubeflow.org)."
        )
        self.argv = argv
        self.returncode = returncode


def _namespace_name(handle: Handle) -> tuple[str, str]:
    namespace, _, name = handle.ident.partition("/")
    return namespace, name


def apply_argv(manifest: Path) -> list[str]:
    return [KUBECTL, "apply", "-f", str(manifest)]


def status_argv(handle: Handle) -> list[str]:
    namespace, name = _namespace_name(handle)
    return [KUBECTL, "get", "pytorchjob", "-n", namespace, name, "-o", f"jsonpath={CONDITIONS_JSONPATH}"]


def logs_argv(handle: Handle, follow: bool = False) -> list[str]:
    """The master pod's trainer output: global rank 0 runs there (static rendezvous)."""
    namespace, name = _namespace_name(handle)
    argv = [KUBECTL, "logs", "-n", namespace, f"{name}-master-0", "-c", k8s_schema.CONTAINER_NAME]
    return [*argv, "-f"] if follow else argv


def cancel_argv(handle: Handle) -> list[str]:
    namespace, name = _namespace_name(handle)
    return [KUBECTL, "delete", "pytorchjob", "-n", namespace, name]


def _not_installed() -> UsageError:
    return UsageError("kubectl is not on PATH: install it (https://kubernetes.io/docs/tasks/tools/) "
                      "and point it at your cluster; `fljob render --backend k8s` works without it.")


def _run(argv: list[str]) -> str:
    """Run kubectl and return its stdout, or raise KubectlError with what it said."""
    try:
        # stdin closed: kubectl must never stop to prompt for a user name or password.
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise _not_installed() from None
    if done.returncode != 0:
        raise KubectlError(argv, done.returncode, done.stderr)
    return done.stdout


def submit(spec: JobSpec, task: Task = "train", dry_run: bool = False) -> Handle | None:
    """Write the manifest into the run folder and `kubectl apply` it; dry-run only shows the command."""
    (rendered,) = kubernetes_render.render(spec, task)
    manifest = rendered.write(Path(spec.resolved_run_dir))
    argv = apply_argv(manifest)
    if dry_run:
        print(f"manifest: {manifest}")
        print(f"would run: {shell_join(argv)}")
        return None
    sys.stderr.write(_run(argv))
    return Handle("k8s", f"{spec.kubernetes.namespace}/{spec.name}")


Condition = tuple[str, str, str, str]  # type, status, reason, message


def parse_conditions(text: str) -> list[Condition]:
    """The conditions in CONDITIONS_JSONPATH output, oldest first."""
    out = []
    for line in text.splitlines():
        if line.strip():
            kind, status_, reason, message = (line.split("\t", 3) + ["", "", ""])[:4]
            out.append((kind, status_, reason, message))
    return out


def summarize(handle: Handle, conditions: list[Condition]) -> str:
    """The job's state is its latest condition that holds (what `kubectl get` shows as State)."""
    current = [c for c in conditions if c[1] == "True"]
    if not current:
        return f"{handle} PENDING (no status yet: the training operator has not picked the job up)"
    kind, _, reason, message = current[-1]
    detail = ": ".join(part for part in (reason, message) if part)
    return f"{handle} {kind.upper()}" + (f" ({detail})" if detail else "")


def status(handle: Handle) -> str:
    return summarize(handle, parse_conditions(_run(status_argv(handle))))


def logs(handle: Handle, follow: bool = False) -> Iterator[str]:
    """Stream the master pod's log line by line; kubectl's errors become KubectlError at the end."""
    argv = logs_argv(handle, follow)
    with tempfile.TemporaryFile("w+") as stderr:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
        except FileNotFoundError:
            raise _not_installed() from None
        try:
            assert proc.stdout is not None
            yield from proc.stdout
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # the reader stopped early (Ctrl-C): do not leave kubectl behind
                proc.terminate()
                proc.wait()
            proc.stdout.close()
        if returncode != 0:
            stderr.seek(0)
            raise KubectlError(argv, returncode, stderr.read())


def cancel(handle: Handle) -> None:
    """Delete the PyTorchJob (the operator deletes its pods); the ConfigMap/Service/PodMonitor stay
    until `kubectl delete -f job.k8s.yaml`."""
    _run(cancel_argv(handle))
