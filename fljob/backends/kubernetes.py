"""Thin kubectl I/O around the Kubernetes renderer: submit, status, logs, cancel.

Every kubectl command line is built by a pure function (tested as exact argv lists); running
them is the only I/O here. A kubectl failure (no cluster, no permission, no training operator)
becomes a UsageError that quotes the command and kubectl's own words, so the CLI exits 2 with
a message instead of a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fljob.backends import k8s_schema, kubernetes_render
from fljob.backends.base import (
    Handle,
    JobState,
    JobStatus,
    Submission,
    SweepStatus,
    Task,
    shell_join,
)
from fljob.backends.kubernetes_render import (
    COMPLETION_INDEX_LABEL,
    JOBSET_NAME_LABEL,
    SWEEP_LABEL,
    TRAINJOB_NODE,
    TRIAL_LABEL,
    check,
    render,
)
from fljob.doctor import kubernetes_checks as doctor_checks
from fljob.errors import UsageError
from fljob.spec import JobSpec

NAME = "k8s"
__all__ = ["NAME", "cancel", "check", "doctor_checks", "logs", "plan", "render", "status", "submit"]
KUBECTL = "kubectl"


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


@dataclass(frozen=True)
class Target:
    """What a k8s:// handle names: k8s://<namespace>/<name> is a PyTorchJob (or a sweep of
    them), k8s://<namespace>/trainjob/<name> a TrainJob (or a sweep of them)."""

    namespace: str
    name: str
    resource: str  # kubectl's resource name: pytorchjob or trainjob

    @classmethod
    def of(cls, handle: Handle) -> Target:
        parts = handle.ident.split("/")
        return cls(parts[0], parts[-1], "trainjob" if len(parts) == 3 else "pytorchjob")


def handle_for(spec: JobSpec) -> Handle:
    k = spec.kubernetes
    middle = "trainjob/" if k.api == "trainjob" else ""
    return Handle(NAME, f"{k.namespace}/{middle}{spec.name}")


def apply_argv(manifest: Path) -> list[str]:
    return [KUBECTL, "apply", "-f", str(manifest)]


def status_argv(handle: Handle) -> list[str]:
    t = Target.of(handle)
    return [KUBECTL, "get", t.resource, "-n", t.namespace, t.name, "-o", "json"]


def sweep_status_argv(handle: Handle) -> list[str]:
    """The trials of a sweep named like the handle (none when it names a single job)."""
    t = Target.of(handle)
    return [KUBECTL, "get", f"{t.resource}s", "-n", t.namespace, "-l", f"{SWEEP_LABEL}={t.name}", "-o", "json"]


def logs_argv(handle: Handle, follow: bool = False) -> list[str]:
    """The trainer output of global rank 0's pod: a PyTorchJob's master pod (static rendezvous on
    it), a TrainJob's node pod of completion index 0."""
    t = Target.of(handle)
    if t.resource == "trainjob":
        selector = f"{JOBSET_NAME_LABEL}={t.name},{COMPLETION_INDEX_LABEL}=0"
        argv = [KUBECTL, "logs", "-n", t.namespace, "-l", selector, "-c", TRAINJOB_NODE, "--tail=-1"]
    else:
        argv = [KUBECTL, "logs", "-n", t.namespace, f"{t.name}-master-0", "-c", k8s_schema.CONTAINER_NAME]
    return [*argv, "-f"] if follow else argv


def cancel_argv(handle: Handle, sweep: bool = False) -> list[str]:
    t = Target.of(handle)
    if sweep:
        return [KUBECTL, "delete", f"{t.resource}s", "-n", t.namespace, "-l", f"{SWEEP_LABEL}={t.name}"]
    return [KUBECTL, "delete", t.resource, "-n", t.namespace, t.name]


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


def plan(spec: JobSpec, task: Task = "train") -> Submission:
    """The dry run: the manifest (every trial's objects for a sweep) and the kubectl apply."""
    folder = Path(spec.resolved_run_dir).absolute()
    files = tuple(render(spec, task))
    return Submission(NAME, folder, files, shell_join(apply_argv(folder / kubernetes_render.MANIFEST_FILE)),
                      spec, task, handle_for(spec))


def submit(plan: Submission) -> Handle:
    """Write the manifest into the run folder and `kubectl apply` it."""
    (manifest,) = plan.write()
    sys.stderr.write(_run(apply_argv(manifest)))
    assert plan.handle is not None
    return plan.handle


# The controllers' condition types, the latest true one wins: the training operator's
# (kubeflow.org/v1 JobConditionType) and Trainer v2's TrainJob conditions.
CONDITION_STATES = {
    "Created": JobState.PENDING, "Suspended": JobState.PENDING, "Running": JobState.RUNNING,
    "Restarting": JobState.REQUEUED, "Succeeded": JobState.COMPLETED, "Complete": JobState.COMPLETED,
    "Failed": JobState.FAILED,
}


def job_status(handle: str, job: dict[str, Any], name: str | None = None) -> JobStatus:
    """A PyTorchJob or TrainJob object (as `kubectl get -o json` returns it) as fljob's status
    record: the state of its latest condition that holds (what `kubectl get` shows), with its
    reason. A TrainJob has no Running condition: its active jobs (status.jobsStatus) say it."""
    status = job.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    current = [c for c in conditions if c.get("status") == "True"]
    logs = shell_join(logs_argv(Handle(NAME, _ident(job))))
    active = sum(int(j.get("active") or 0) for j in status.get("jobsStatus") or [] if isinstance(j, dict))
    if not current or current[-1].get("type") == "Created" and active:
        if active:
            return JobStatus(handle, JobState.RUNNING, native=f"{active} active jobs", logs=logs, name=name)
        return JobStatus(handle, JobState.PENDING, native="no status yet: the controller has not picked the job up",
                         logs=logs, name=name)
    last = current[-1]
    kind = str(last.get("type", ""))
    detail = ": ".join(str(part) for part in (last.get("reason"), last.get("message")) if part)
    return JobStatus(handle, CONDITION_STATES.get(kind, JobState.UNKNOWN), native=kind,
                     details=(("reason", detail),) if detail else (), logs=logs, name=name)


def _ident(job: dict[str, Any]) -> str:
    meta = job.get("metadata") or {}
    middle = "trainjob/" if job.get("kind") == "TrainJob" else ""
    return f"{meta.get('namespace', '')}/{middle}{meta.get('name', '')}"


def status(handle: Handle) -> JobStatus | SweepStatus:
    trials = json.loads(_run(sweep_status_argv(handle))).get("items") or []
    if trials:
        trials.sort(key=lambda job: int(job["metadata"]["labels"].get(TRIAL_LABEL, "0")))
        return SweepStatus(str(handle), Target.of(handle).name, tuple(
            job_status(f"k8s://{_ident(job)}", job, name=job["metadata"]["name"]) for job in trials))
    return job_status(str(handle), json.loads(_run(status_argv(handle))))


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
    """Delete the PyTorchJob, or every trial of the sweep (the operator deletes their pods); the
    ConfigMaps, Service and PodMonitor stay until `kubectl delete -f job.k8s.yaml`."""
    sweep = bool(json.loads(_run(sweep_status_argv(handle))).get("items"))
    _run(cancel_argv(handle, sweep=sweep))
