"""Render a job spec into one multi-document manifest for `kubectl apply -f`.

Objects, in this order: a ConfigMap `<name>-spec` with the resolved spec (mounted read-only at
/etc/fljob in every pod), the Kubeflow `PyTorchJob` (kubeflow.org/v1: Master with one replica,
Worker with nodes-1, container `pytorch`), and when metrics are on a Service `<name>-metrics`
and a PodMonitor `<name>` for the master pod's `metrics` port.

How the pods start. The training operator sets MASTER_ADDR/MASTER_PORT (the master pod's
Service and the `pytorchjob-port` declared here), PET_NNODES and PET_NODE_RANK (0 on the
master, 1.. on the workers). The container runs a fixed /bin/sh script that starts `fljob
launch` with torchrun's *static* rendezvous on those variables: node rank 0 is then the master
pod, so global rank 0, which serves /metrics, is always where the Service and the PodMonitor
look (c10d would order nodes by host name). The script forwards SIGTERM (Kubernetes' pre-kill
signal; sh as PID 1 would drop it) to the launcher, and maps the trainer's requeue exit code to
138, the code the operator's `ExitCode` restart policy treats as retryable (75 counts as a
permanent failure there). No spec value reaches the script: it reads only environment
variables, and the only numbers in it are integers from the validated spec.

Secret values never appear: credentials are `secretKeyRef`s naming a Secret and a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from fljob.backends import k8s_schema
from fljob.backends.base import (
    GENERATED_BY,
    SPEC_FILE,
    TASK_ARGV,
    RenderedFile,
    Task,
    check_job_or_sweep,
    secret_field,
    secret_refs,
)
from fljob.backends.shell import forward_and_wait
from fljob.exitcodes import REQUEUE
from fljob.spec import JobSpec, Problem, SpecError, dump_spec, problem_at
from fljob.spec.k8s_fields import KUEUE_QUEUE_LABEL, Toleration
from fljob.spec.sweep import expand

MANIFEST_FILE = "job.k8s.yaml"
SPEC_DIR = "/etc/fljob"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
# The operator reads MASTER_PORT from the pytorch container's port of this name; its webhook
# would add it with this default value, so rendering it keeps `kubectl apply` free of drift.
RDZV_PORT_NAME = "pytorchjob-port"
RDZV_PORT = 23456
METRICS_PORT_NAME = "metrics"
# training-operator: with restartPolicy ExitCode, 130/137/143 (signals) and 138 ("user-defined
# retryable", 128 + SIGUSR1) restart the pod; every other non-zero code fails the job.
RETRYABLE_EXIT = 138

# Labels fljob owns; the Service and the PodMonitor select pods by them.
NAME_LABEL, INSTANCE_LABEL, JOB_LABEL, ROLE_LABEL, TASK_LABEL, SWEEP_LABEL, TRIAL_LABEL = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "fljob.dev/job", "fljob.dev/role", "fljob.dev/task",
    "fljob.dev/sweep", "fljob.dev/trial")
OWNED_LABELS = (NAME_LABEL, INSTANCE_LABEL, "app.kubernetes.io/managed-by", JOB_LABEL, ROLE_LABEL, TASK_LABEL,
                SWEEP_LABEL, TRIAL_LABEL)



# --------------------------------------------------------------------------- checks


def job_problems(spec: JobSpec) -> list[Problem]:
    """Kubernetes-specific requirements a generic spec does not carry."""
    k = spec.kubernetes
    problems: list[Problem] = []
    if not spec.image:
        problems.append(problem_at(spec, "image", "Kubernetes runs a container image: set image "
                                   "(e.g. image: ghcr.io/you/fljob:0.1.0)."))
    for target, ref in sorted(secret_refs(spec).items()):
        if ref.k8s_secret is None:
            problems.append(problem_at(spec, secret_field(spec, target),
                                       "has no k8s_secret; on Kubernetes the value comes from a Secret: add "
                                       f"k8s_secret: {{name: <secret>, key: <key>}} (a Secret in namespace {k.namespace})."))
    for field, keys in (("kubernetes.labels", k.labels), ("kubernetes.pod_monitor.labels", k.pod_monitor.labels)):
        problems += [problem_at(spec, f"{field}.{key}", "fljob sets this label itself (its selectors use it); "
                                "use another key.") for key in sorted(set(keys) & set(OWNED_LABELS))]
    last_pod = pod_names(spec)[-1]
    if len(last_pod) > 63:
        problems.append(problem_at(spec, "name", f"the operator names a pod and its Service {last_pod!r}, longer "
                                   "than Kubernetes' 63 characters: shorten the name or use fewer nodes."))
    return problems


def check(spec: JobSpec) -> None:
    check_job_or_sweep(spec, lambda job: [*job_problems(job), *trainjob_problems(job)])
    sweep = spec.sweep
    if sweep is not None and sweep.parallel < sweep.size and not spec.kubernetes.queue:
        raise SpecError(spec.origin(), [problem_at(
            spec, "sweep.parallel", f"Kubernetes starts all {sweep.size} trials at once unless a queue "
            f"admits them: set kubernetes.queue to a Kueue LocalQueue whose quota fits {sweep.parallel} "
            f"trials (k8s/README.md), or set sweep.parallel to {sweep.size}.")])


def pod_names(spec: JobSpec) -> list[str]:
    """The pods the training operator creates (and the per-pod Services named like them)."""
    return [f"{spec.name}-master-0", *(f"{spec.name}-worker-{i}" for i in range(spec.resources.nodes - 1))]


# --------------------------------------------------------------------------- objects


def selector_labels(spec: JobSpec) -> dict[str, str]:
    """The labels every object of the job carries; kubectl -l fljob.dev/job=<name> finds them all,
    and -l fljob.dev/sweep=<sweep> every trial of a sweep."""
    labels = {NAME_LABEL: "fljob", INSTANCE_LABEL: spec.name, JOB_LABEL: spec.name}
    if spec.trial is None:
        return labels
    return {**labels, SWEEP_LABEL: spec.trial.sweep, TRIAL_LABEL: str(spec.trial.index)}


def _labels(spec: JobSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**selector_labels(spec), "app.kubernetes.io/managed-by": "fljob",
            **dict(sorted(spec.kubernetes.labels.items())), **(extra or {})}


def _metadata(spec: JobSpec, name: str, labels: dict[str, str], annotations: bool = False) -> dict[str, Any]:
    """Object metadata; the spec's annotations go on the job and its pods only."""
    out: dict[str, Any] = {"name": name, "namespace": spec.kubernetes.namespace, "labels": labels}
    if annotations and spec.kubernetes.annotations:
        out["annotations"] = dict(sorted(spec.kubernetes.annotations.items()))
    return out


@dataclass(frozen=True)
class Rendezvous:
    """Where each API's controller puts the rendezvous, and what a retry needs."""

    controller: str
    master_addr: str
    master_port: str
    requeue_exit: int  # what the pod exits with when the trainer asks to be requeued
    retry: str  # who retries it


RENDEZVOUS: dict[str, Rendezvous] = {
    # training-operator v1: MASTER_ADDR/PORT are the master pod's Service; with restartPolicy
    # ExitCode only 138 (and signals) restart a pod, 75 would fail the job.
    "pytorchjob": Rendezvous("the Kubeflow training operator (PyTorchJob v1)", "MASTER_ADDR", "MASTER_PORT",
                             RETRYABLE_EXIT, "retryable under restartPolicy ExitCode"),
    # Trainer v2's torch plugin sets PET_*; the JobSet's failure policy restarts on any failure.
    "trainjob": Rendezvous("Kubeflow Trainer v2 (TrainJob, torch runtime)", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                           REQUEUE, "the runtime's JobSet failure policy restarts it"),
}


def container_script(spec: JobSpec, task: Task) -> str:
    """The pod's /bin/sh program: static rendezvous on the controller's variables, SIGTERM
    forwarded, the requeue code made retryable. No `$(`: Kubernetes would expand it."""
    r = RENDEZVOUS[spec.kubernetes.api]
    launch = " ".join([
        "fljob launch",
        "--rdzv-backend=static",
        '--nnodes="$PET_NNODES"',
        '--node-rank="$PET_NODE_RANK"',
        f'--master-addr="${r.master_addr}"',
        f'--master-port="${r.master_port}"',
        f"--nproc-per-node={spec.resources.nproc_per_node}",
        "--",
        *TASK_ARGV[task],
        '"$FLJOB_SPEC"',
    ])
    return f"""\
set -u
if [ -z "${{{r.master_addr}:-}}" ] || [ -z "${{{r.master_port}:-}}" ] || [ -z "${{PET_NNODES:-}}" ] || [ -z "${{PET_NODE_RANK:-}}" ]; then
  echo "fljob: {r.master_addr}, {r.master_port}, PET_NNODES and PET_NODE_RANK must be set by {r.controller}" >&2
  exit 2
fi
echo "fljob: node $PET_NODE_RANK of $PET_NNODES, rendezvous ${r.master_addr}:${r.master_port}"
{forward_and_wait("TERM", launch, "the launcher (the trainer checkpoints and stops)")}
if [ "$rc" -eq {REQUEUE} ]; then
  echo "fljob: the trainer checkpointed and asks to be restarted; exiting {r.requeue_exit} ({r.retry})" >&2
  exit {r.requeue_exit}
fi
echo "fljob: launcher finished with exit code $rc"
exit "$rc"
"""


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    fixed = {
        "FLJOB_JOB_NAME": spec.name,
        "FLJOB_RUN_ID": spec.name,  # the PyTorchJob's name: stable across pod restarts, like a SLURM job id
        "FLJOB_BACKEND": "k8s",
        "FLJOB_RUN_DIR": spec.resolved_run_dir,
        "FLJOB_SPEC": SPEC_PATH,
    }
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in fixed.items()]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    for target, ref in sorted(secret_refs(spec).items()):
        assert ref.k8s_secret is not None  # check() requires it
        env.append({"name": target, "valueFrom": {"secretKeyRef": {"name": ref.k8s_secret.name,
                                                                   "key": ref.k8s_secret.key}}})
    return env


def _resources(spec: JobSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpus_per_node:
        requests["cpu"] = str(r.cpus_per_node)
    if r.memory_gib:
        requests["memory"] = f"{r.memory_gib}Gi"
    if r.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(r.gpus_per_node)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _volume_mounts() -> list[dict[str, Any]]:
    return [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]


def _volumes(spec: JobSpec) -> list[dict[str, Any]]:
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.kubernetes.shm_size}},
            {"name": "spec", "configMap": {"name": f"{spec.name}-spec", "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}}]


def _scheduling(spec: JobSpec) -> dict[str, Any]:
    """The pod fields a job spec may set for placement and identity, those that are set."""
    k = spec.kubernetes
    fields: dict[str, Any] = {
        "serviceAccountName": k.service_account,
        "nodeSelector": dict(sorted(k.node_selector.items())) or None,
        "tolerations": [_toleration(t) for t in k.tolerations] or None,
        "affinity": (k.affinity.to_pod_spec() or None) if k.affinity else None,  # {} says nothing
        "priorityClassName": k.priority_class,
        "schedulerName": k.scheduler_name,
        "imagePullSecrets": [{"name": n} for n in k.image_pull_secrets] or None,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _pod_metadata(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": _labels(spec, labels)}
    if spec.kubernetes.annotations:
        metadata["annotations"] = dict(sorted(spec.kubernetes.annotations.items()))
    return metadata


def _pod_template(spec: JobSpec, task: Task, role: str) -> dict[str, Any]:
    k = spec.kubernetes
    ports = [{"name": RDZV_PORT_NAME, "containerPort": RDZV_PORT, "protocol": "TCP"}]
    if role == "master" and spec.metrics.enabled:
        ports.append({"name": METRICS_PORT_NAME, "containerPort": spec.metrics.port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": k8s_schema.CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": ["/bin/sh", "-c", container_script(spec, task)],
        "env": _env(spec),
        "ports": ports,
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    container["volumeMounts"] = _volume_mounts()
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": _volumes(spec),
        "terminationGracePeriodSeconds": k.termination_grace_seconds,
        "automountServiceAccountToken": False,  # the trainer never calls the Kubernetes API
        **_scheduling(spec),
    }
    return {"metadata": _pod_metadata(spec, {ROLE_LABEL: role, TASK_LABEL: task}), "spec": pod}


def _toleration(t: Toleration) -> dict[str, Any]:
    fields = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
              "tolerationSeconds": t.toleration_seconds}
    return {key: value for key, value in fields.items() if value is not None}


def pytorchjob(spec: JobSpec, task: Task) -> dict[str, Any]:
    k = spec.kubernetes
    replicas = {"Master": 1, "Worker": spec.resources.nodes - 1}
    run_policy: dict[str, Any] = {"backoffLimit": k.backoff_limit}
    if k.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = k.active_deadline_seconds
    if k.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    run_policy["cleanPodPolicy"] = k.clean_pod_policy
    volcano = k.scheduler_name == "volcano"
    if volcano or k.priority_class:  # gang scheduling (Volcano, scheduler-plugins) reads these
        scheduling = {"minAvailable": spec.resources.nodes, "queue": k.queue if volcano else None,
                      "priorityClass": k.priority_class}
        run_policy["schedulingPolicy"] = {key: v for key, v in scheduling.items() if v is not None}
    labels = {TASK_LABEL: task}
    if k.queue and not volcano:  # Kueue: created suspended, admitted (unsuspended) from the queue
        labels[KUEUE_QUEUE_LABEL] = k.queue
        run_policy["suspend"] = True
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec, spec.name, _labels(spec, labels), annotations=True),
        "spec": {
            "nprocPerNode": str(spec.resources.nproc_per_node),
            "pytorchReplicaSpecs": {
                rtype: {"replicas": n, "restartPolicy": k.restart_policy,
                        "template": _pod_template(spec, task, rtype.lower())}
                for rtype, n in replicas.items() if n > 0
            },
            "runPolicy": run_policy,
        },
    }


# Trainer v2: the torch runtime's replicated job and container that run the trainer.
TRAINJOB_NODE = "node"
TRAINJOB_PATCH_MANAGER = "fljob.dev/render"
# Labels the Job and JobSet controllers put on a TrainJob's pods: node rank 0 has index 0.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# The PyTorchJob-only fields a TrainJob cannot set per job (Trainer v2.3 runtime patches have no
# such field): set them in the ClusterTrainingRuntime instead.
RUNTIME_OWNED = {"priority_class": "priorityClassName", "scheduler_name": "schedulerName",
                 "image_pull_policy": "imagePullPolicy", "restart_policy": "the JobSet failurePolicy",
                 "backoff_limit": "failurePolicy.maxRestarts", "ttl_seconds_after_finished": "ttlSecondsAfterFinished",
                 "clean_pod_policy": "the JobSet's own clean-up"}


def trainjob_problems(spec: JobSpec) -> list[Problem]:
    """Fields a TrainJob cannot carry, set away from their defaults."""
    k = spec.kubernetes
    if k.api != "trainjob":
        return []
    defaults = type(k).model_fields
    return [problem_at(spec, f"kubernetes.{field}", f"a TrainJob cannot set it per job (the runtime owns "
                       f"{owner}): set it in the ClusterTrainingRuntime {k.runtime!r} (k8s/trainjob-runtime.yaml), "
                       "or use kubernetes.api: pytorchjob.")
            for field, owner in RUNTIME_OWNED.items() if getattr(k, field) != defaults[field].default]


def trainjob(spec: JobSpec, task: Task) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob on ``kubernetes.runtime``: the trainer (image, command,
    env, nodes, processes, resources) in ``trainer``, the pod's placement, volumes and labels
    as a runtime patch of the runtime's ``node`` job."""
    k = spec.kubernetes
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": ["/bin/sh", "-c", container_script(spec, task)],
        "env": _env(spec),
        "numNodes": spec.resources.nodes,
        "numProcPerNode": spec.resources.nproc_per_node,
    }
    resources = _resources(spec)
    if resources:
        trainer["resourcesPerNode"] = resources
    pod = {
        "metadata": _pod_metadata(spec, {TASK_LABEL: task}),
        "spec": {"containers": [{"name": TRAINJOB_NODE, "volumeMounts": _volume_mounts()}],
                 "volumes": _volumes(spec), "terminationGracePeriodSeconds": k.termination_grace_seconds,
                 **{key: v for key, v in _scheduling(spec).items() if key not in ("priorityClassName", "schedulerName")}},
    }
    patch = {"manager": TRAINJOB_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": TRAINJOB_NODE, "template": {"spec": {"template": pod}}}]}}}}
    body: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": k.runtime},
        "trainer": trainer,
        "runtimePatches": [patch],
    }
    if k.active_deadline_seconds is not None:
        body["activeDeadlineSeconds"] = k.active_deadline_seconds
    labels = {TASK_LABEL: task}
    if k.queue:  # Kueue admits it from the queue (unsuspends it)
        labels[KUEUE_QUEUE_LABEL] = k.queue
        body["suspend"] = True
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": _metadata(spec, spec.name, _labels(spec, labels), annotations=True), "spec": body}


def master_selector(spec: JobSpec) -> dict[str, str]:
    """The labels of the pod that runs global rank 0 (and serves /metrics)."""
    if spec.kubernetes.api == "trainjob":
        return {**selector_labels(spec), COMPLETION_INDEX_LABEL: "0"}
    return {**selector_labels(spec), ROLE_LABEL: "master"}


def _pod_monitor(spec: JobSpec, selector: dict[str, str]) -> dict[str, Any]:
    pm = spec.kubernetes.pod_monitor
    # A TrainJob's container comes from the runtime, which declares no port by this name: the
    # endpoint names the number instead (prometheus-operator's targetPort).
    port: dict[str, Any] = {"targetPort": spec.metrics.port} if spec.kubernetes.api == "trainjob" \
        else {"port": METRICS_PORT_NAME}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(spec, spec.name, _labels(spec, dict(sorted(pm.labels.items())))),
        "spec": {
            # Prometheus' `job` label becomes the job name; the trainer's own job/run_id
            # labels win over the target's (honorLabels).
            "jobLabel": JOB_LABEL,
            "selector": {"matchLabels": selector},
            "podMetricsEndpoints": [{**port, "path": "/metrics", "interval": pm.interval, "honorLabels": True}],
        },
    }


def _spec_config_map(spec: JobSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, f"{spec.name}-spec", _labels(spec)),
            "data": {SPEC_FILE: dump_spec(spec)}}


def objects(spec: JobSpec, task: Task = "train") -> list[dict[str, Any]]:
    """The Kubernetes objects of the job, as plain data in a fixed order.

    A sweep is one ConfigMap and one PyTorchJob per trial, every object labelled
    fljob.dev/sweep=<sweep name>, and one PodMonitor for all trials' master pods: each trial
    keeps the single job's restart and preemption behaviour and can span several nodes, and a
    Kueue queue (kubernetes.queue) admits as many as its quota allows (k8s/README.md).
    """
    metrics = spec.metrics.enabled and spec.kubernetes.pod_monitor.enabled
    job = trainjob if spec.kubernetes.api == "trainjob" else pytorchjob
    if spec.sweep is not None:
        out: list[dict[str, Any]] = []
        for trial in expand(spec):
            out += [_spec_config_map(trial.spec), job(trial.spec, task)]
        if metrics:
            rank0 = {k: v for k, v in master_selector(spec).items() if k not in (INSTANCE_LABEL, JOB_LABEL)}
            out.append(_pod_monitor(spec, {**rank0, SWEEP_LABEL: spec.name}))
        return out
    out = [_spec_config_map(spec), job(spec, task)]
    if spec.metrics.enabled and spec.kubernetes.api == "pytorchjob":
        port = {"name": METRICS_PORT_NAME, "port": spec.metrics.port, "targetPort": METRICS_PORT_NAME,
                "protocol": "TCP"}
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": _metadata(spec, f"{spec.name}-metrics", _labels(spec)),
                    "spec": {"type": "ClusterIP", "selector": master_selector(spec), "ports": [port]}})
    if metrics:
        out.append(_pod_monitor(spec, master_selector(spec)))
    return out


# --------------------------------------------------------------------------- YAML


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, never anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """One multi-document YAML text; key order is the order the objects were built in."""
    body = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=True, width=1 << 16)
    return f"# {GENERATED_BY}\n{body}"


def render(spec: JobSpec, task: Task = "train") -> list[RenderedFile]:
    """One file for `kubectl apply -f`, checked against fljob's own schema before it is returned."""
    check(spec)
    docs = objects(spec, task)
    k8s_schema.validate(docs)
    return [RenderedFile(MANIFEST_FILE, to_yaml(docs))]
