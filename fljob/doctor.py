"""`fljob doctor`: preflight checks before a job waits hours in a queue only to fail at start.

Each check asks the real thing (the SLURM controller, the S3 endpoint, the Kubernetes API)
what the spec needs, and prints one line: PASS, FAIL with a one-line fix, or SKIP with why it
could not be asked. Exit 0 when nothing failed, 1 otherwise (a bad spec is 2, as everywhere).
Credentials are resolved from the spec's references to make the S3 request; no value is ever
printed. boto3 is imported only when a spec names an s3:// URI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from fljob.backends.base import secret_field
from fljob.errors import UsageError
from fljob.spec import JobSpec

Status = Literal["PASS", "FAIL", "SKIP"]
TOOL_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RequiredCrd:
    """A CustomResourceDefinition the Kubernetes renderer writes objects of, and how to get it."""

    name: str
    version: str
    install: str


PYTORCHJOB_CRD = RequiredCrd(
    "pytorchjobs.kubeflow.org", "v1",
    "install the Kubeflow training operator v1 (kubectl apply --server-side -k "
    "'github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.4')")
PODMONITOR_CRD = RequiredCrd(
    "podmonitors.monitoring.coreos.com", "v1",
    "install the Prometheus operator (e.g. the kube-prometheus-stack chart), or set "
    "kubernetes.pod_monitor.enabled: false")

# tool -> how to get it; printed as the fix when the tool is missing.
TOOL_FIXES = {
    "sbatch": "run on a SLURM login node, or install the client (Debian/Ubuntu: apt-get install slurm-client)",
    "srun": "run on a SLURM login node, or install the client (Debian/Ubuntu: apt-get install slurm-client)",
    "sacct": "install slurm-client; fljob status needs SLURM accounting (slurmdbd) for finished jobs",
    "scontrol": "install slurm-client (Debian/Ubuntu: apt-get install slurm-client)",
    "kubectl": "install kubectl (https://kubernetes.io/docs/tasks/tools/) and point KUBECONFIG at the cluster",
}


@dataclass(frozen=True)
class Check:
    status: Status
    name: str
    detail: str
    fix: str = ""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a cluster tool; None when it does not answer within TOOL_TIMEOUT_S."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def check_tools(tools: tuple[str, ...], name: str) -> Check:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return Check("FAIL", name, f"not on PATH: {', '.join(missing)}", TOOL_FIXES[missing[0]])
    return Check("PASS", name, f"{', '.join(tools)} on PATH")


# --------------------------------------------------------------------------- SLURM


def slurm_seconds(text: str) -> int | None:
    """A SLURM time limit in seconds; None for UNLIMITED/INFINITE.

    SLURM's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
    """
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = 0, parts[0], 0
    return (h * 60 + m) * 60 + s


def check_container_runtime(spec: JobSpec) -> Check:
    runtime = spec.slurm.container.runtime
    name = f"container runtime ({runtime})"
    if runtime == "none":
        return Check("SKIP", name, "slurm.container.runtime is none: the step runs without a container")
    if runtime == "apptainer":
        found = shutil.which("apptainer") or shutil.which("singularity")
        if not found:
            return Check("FAIL", name, "neither apptainer nor singularity is on PATH here",
                         "install apptainer on every compute node (https://apptainer.org/docs), or "
                         f"set slurm.container.runtime: pyxis ({spec.origin('slurm.container.runtime')})")
        return Check("PASS", name, f"{found} (this host; compute nodes need it too)")
    if shutil.which("srun") is None:
        return Check("SKIP", name, "srun is missing, so pyxis cannot be asked")
    proc = _run(["srun", "--help"])
    if proc is not None and "--container-image" in proc.stdout + proc.stderr:
        return Check("PASS", name, "srun --help lists --container-image")
    return Check("FAIL", name, "srun has no --container-image option: the pyxis plugin is not loaded",
                 "ask the admins for pyxis/enroot (plugstack.conf), or set slurm.container.runtime: "
                 f"apptainer ({spec.origin('slurm.container.runtime')})")


def _partition_record(spec: JobSpec) -> dict[str, str] | Check:
    """`scontrol show partition -o` for the spec's partition (or the cluster's default)."""
    name = "partition limits"
    if shutil.which("scontrol") is None:
        return Check("SKIP", name, "scontrol is missing, so the partition cannot be asked")
    proc = _run(["scontrol", "show", "partition", "-o"])
    if proc is None or proc.returncode != 0:
        why = "timed out" if proc is None else _first_line(proc.stderr)
        return Check("FAIL", "slurm controller", f"scontrol show partition: {why}",
                     "export SLURM_CONF=<your cluster's slurm.conf> and check `scontrol ping`")
    records = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in proc.stdout.splitlines() if line.strip()]
    wanted = spec.slurm.partition
    for record in records:
        if (record.get("PartitionName") == wanted) if wanted else record.get("Default") == "YES":
            return record
    known = ", ".join(r.get("PartitionName", "?") for r in records) or "none"
    if wanted:
        return Check("FAIL", name, f"partition {wanted!r} does not exist (there are: {known})",
                     f"set slurm.partition to one of them ({spec.origin('slurm.partition')})")
    return Check("FAIL", name, f"the cluster has no default partition (there are: {known})",
                 "set slurm.partition in the spec or the site profile")


def check_partition(spec: JobSpec) -> Iterator[Check]:
    record = _partition_record(spec)
    if isinstance(record, Check):
        yield record
        return
    part = record["PartitionName"]
    yield Check("PASS", "slurm controller", f"partition {part} answered")
    if record.get("State", "UP") != "UP":
        yield Check("FAIL", "partition state", f"partition {part} is {record['State']}",
                    "wait until the admins bring it UP, or pick another slurm.partition")
    limit = slurm_seconds(record.get("MaxTime", "UNLIMITED"))
    wanted = slurm_seconds(spec.slurm.time)
    if limit is not None and wanted is not None and wanted > limit:
        yield Check("FAIL", "partition time limit",
                    f"slurm.time {spec.slurm.time} exceeds partition {part}'s MaxTime {record['MaxTime']}",
                    f"set slurm.time to at most {record['MaxTime']} ({spec.origin('slurm.time')}); "
                    "checkpoints and requeue carry a long run across several jobs")
    else:
        yield Check("PASS", "partition time limit",
                    f"slurm.time {spec.slurm.time} within MaxTime {record.get('MaxTime', 'UNLIMITED')}")
    nodes = spec.resources.nodes
    max_nodes = record.get("MaxNodes", "UNLIMITED")
    total = int(record.get("TotalNodes", "0") or 0)
    limits = [int(max_nodes)] if max_nodes.isdigit() else []
    limits += [total] if total else []
    if limits and nodes > min(limits):
        yield Check("FAIL", "partition nodes",
                    f"resources.nodes {nodes} exceeds partition {part} (MaxNodes {max_nodes}, "
                    f"TotalNodes {total})",
                    f"set resources.nodes to at most {min(limits)} ({spec.origin('resources.nodes')})")
    else:
        yield Check("PASS", "partition nodes", f"{nodes} node(s) fit partition {part} "
                    f"(MaxNodes {max_nodes}, TotalNodes {total})")


def slurm_checks(spec: JobSpec | None) -> Iterator[Check]:
    yield check_tools(("sbatch", "srun", "sacct"), "slurm tools")
    if spec is None:
        return
    yield check_container_runtime(spec)
    yield from check_partition(spec)


# --------------------------------------------------------------------------- Kubernetes


def check_crd(crd: RequiredCrd) -> Check:
    name = f"CRD {crd.name}"
    proc = _run(["kubectl", "get", "crd", crd.name, "-o", "json"])
    if proc is None or proc.returncode != 0:
        return Check("FAIL", name, "not installed in the cluster", crd.install)
    versions = json.loads(proc.stdout).get("spec", {}).get("versions", [])
    served = sorted(v["name"] for v in versions if v.get("served"))
    if crd.version not in served:
        return Check("FAIL", name, f"served versions {served or 'none'}; fljob renders {crd.version}",
                     crd.install)
    return Check("PASS", name, f"served versions: {', '.join(served)}")


def kubernetes_checks(spec: JobSpec | None) -> Iterator[Check]:
    crds = [PYTORCHJOB_CRD]
    if spec is not None and spec.kubernetes.pod_monitor.enabled:
        crds.append(PODMONITOR_CRD)
    tools = check_tools(("kubectl",), "kubectl")
    yield tools
    if tools.status != "PASS":
        yield from (Check("SKIP", f"CRD {crd.name}", "kubectl is missing") for crd in crds)
        return
    probe = _run(["kubectl", "version", "-o", "json", f"--request-timeout={int(TOOL_TIMEOUT_S)}s"])
    if probe is None or probe.returncode != 0 or '"serverVersion"' not in probe.stdout:
        why = "timed out" if probe is None else _first_line(probe.stderr)
        yield from (Check("SKIP", f"CRD {crd.name}",
                          f"no cluster reachable ({why}); run doctor where kubectl reaches it")
                    for crd in crds)
        return
    yield from (check_crd(crd) for crd in crds)


# --------------------------------------------------------------------------- storage


def s3_uris(spec: JobSpec) -> dict[str, str]:
    """Every s3:// URI the job reads or writes, by the spec field that names it."""
    named = {f"data.streams[{i}].uri": s.uri for i, s in enumerate(spec.data.streams)}
    if spec.checkpoint.uri:
        named["checkpoint.uri"] = spec.checkpoint.uri
    return {field: uri for field, uri in named.items() if uri.startswith("s3://")}


def storage_checks(spec: JobSpec | None) -> Iterator[Check]:
    if spec is None:
        return
    uris = s3_uris(spec)
    if not uris:
        yield Check("SKIP", "S3 buckets", "the spec names no s3:// URI")
        return
    from fljob.storage import apply_storage_environment, check_bucket, split_s3

    for target, ref in spec.storage.credential_refs().items():
        if ref.env and not ref.file and ref.env not in os.environ and target not in os.environ:
            field = secret_field(spec, target)
            yield Check("FAIL", "S3 credentials", f"{field} refers to ${ref.env}, which is not set here",
                        f"export {ref.env} before submitting (the job inherits it)")
            return
    try:
        apply_storage_environment(spec.storage)
    except UsageError as exc:
        yield Check("FAIL", "S3 credentials", "a credential file cannot be read", str(exc))
        return
    by_bucket: dict[str, list[str]] = {}
    for field, uri in uris.items():
        by_bucket.setdefault(split_s3(uri)[0], []).append(field)
    for bucket, fields in by_bucket.items():
        name = f"S3 bucket {bucket}"
        try:
            check_bucket(f"s3://{bucket}")
        except UsageError as exc:
            yield Check("FAIL", name, f"used by {', '.join(fields)}", str(exc))
        else:
            endpoint = spec.storage.endpoint_url or "AWS"
            yield Check("PASS", name, f"reachable at {endpoint} with the referenced credentials "
                        f"(used by {', '.join(fields)})")


# --------------------------------------------------------------------------- local


def local_checks(spec: JobSpec | None) -> Iterator[Check]:
    import importlib.util

    missing = [m for m in ("torch", "torchtitan") if importlib.util.find_spec(m) is None]
    if missing:
        yield Check("FAIL", "trainer packages", f"not importable here: {', '.join(missing)}",
                    "pip install 'fljob[trainer]' torch==2.13.0 (a pinned torch)")
    else:
        yield Check("PASS", "trainer packages", "torch and torchtitan importable")


def run_checks(spec: JobSpec | None, backend: str) -> Iterator[Check]:
    """The backend's own checks (its module's ``doctor_checks``), then the storage checks."""
    from fljob import backends

    yield from backends.get(backend).doctor_checks(spec)
    yield from storage_checks(spec)


def main(spec: JobSpec | None, backend: str = "local") -> int:
    """Print every check as it completes; 1 when any failed."""
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    width = 36
    for check in run_checks(spec, backend):
        counts[check.status] += 1
        print(f"{check.status}  {check.name:<{width}} {check.detail}", flush=True)
        if check.fix:
            print(f"      {'':<{width}} fix: {check.fix}", flush=True)
    print(f"doctor ({backend}): {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0
