"""The Kubernetes backend: the rendered manifest, its validation, the pod's command, kubectl I/O.

No Kubernetes API server exists here (nor can one be installed offline), so the manifest is
checked three ways instead: fljob's own schema (which `render` also runs), the official
PyTorchJob CRD schema from ../shared/schemas (with unknown fields rejected, as kubectl's strict
field validation does), and the Kubernetes OpenAPI schema through kubernetes-validate. The
pod's /bin/sh program runs for real against a recording stand-in for `fljob`, and the kubectl
command lines are checked exactly; the one real kubectl run talks to a closed port.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import k8s_validation
import kubernetes_validate
import pytest
import yaml

from fljob import cli
from fljob.backends import k8s_schema, kubernetes, kubernetes_render
from fljob.backends.base import Handle
from fljob.errors import UsageError
from fljob.exitcodes import REQUEUE
from fljob.spec import JobSpec, SpecError, load_spec, load_spec_text

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "k8s"
K8S_VERSIONS = k8s_validation.K8S_VERSIONS
GOLDEN_SPECS = ("cpu-1node", "gpu-4node")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def spec_of(stem: str, overrides: list[str] = ()) -> JobSpec:
    return load_spec(GOLDEN / f"{stem}.spec.yaml", overrides)


def docs_of(spec: JobSpec, task: str = "train") -> list[dict[str, Any]]:
    (rendered,) = kubernetes_render.render(spec, task)  # type: ignore[arg-type]
    return list(yaml.safe_load_all(rendered.content))


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def pod_spec(job: dict[str, Any], rtype: str = "Master") -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("stem", GOLDEN_SPECS)
def test_golden(stem: str) -> None:
    """Set FLJOB_UPDATE_GOLDEN=1 to accept a deliberate change (then review the git diff)."""
    (rendered,) = kubernetes_render.render(spec_of(stem))
    path = GOLDEN / f"{stem}.train.k8s.yaml"
    if os.environ.get("FLJOB_UPDATE_GOLDEN") == "1":
        path.write_text(rendered.content)
    expected = path.read_text() if path.exists() else ""
    if rendered.content != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), rendered.content.splitlines(True),
                                            str(path), "rendered"))
        pytest.fail(f"{path.name} differs from the render (FLJOB_UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_render_is_byte_stable_whatever_the_order_of_mappings_in_the_spec() -> None:
    text = (GOLDEN / "gpu-4node.spec.yaml").read_text()
    reordered = text.replace("env: {NCCL_DEBUG: WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING: \"1\"}",
                             "env: {TORCH_NCCL_ASYNC_ERROR_HANDLING: \"1\", NCCL_DEBUG: WARN}")
    reordered = reordered.replace("labels: {team: pretraining, kueue.x-k8s.io/queue-name: llm}",
                                  "labels: {kueue.x-k8s.io/queue-name: llm, team: pretraining}")
    assert reordered != text
    first = kubernetes_render.render(load_spec_text(text, "a.yaml"))[0].content
    again = kubernetes_render.render(load_spec_text(text, "a.yaml"))[0].content
    other = kubernetes_render.render(load_spec_text(reordered, "b.yaml"))[0].content
    assert first == again
    # the ConfigMap's spec keeps the user's order; everything fljob builds itself is sorted
    strip = lambda t: [d for d in yaml.safe_load_all(t) if d["kind"] != "ConfigMap"]
    assert yaml.safe_dump_all(strip(first), sort_keys=False) == yaml.safe_dump_all(strip(other), sort_keys=False)


# --------------------------------------------------------------------------- structure


def test_four_node_job_has_one_master_three_workers_and_the_spec_settings() -> None:
    docs = docs_of(spec_of("gpu-4node"))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob", "Service", "PodMonitor"]
    kinds = by_kind(docs)
    job = kinds["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["metadata"]["namespace"] == "llm-training"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {t: r["replicas"] for t, r in replicas.items()} == {"Master": 1, "Worker": 3}
    assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"] == {
        "backoffLimit": 5, "activeDeadlineSeconds": 604800, "ttlSecondsAfterFinished": 86400,
        "cleanPodPolicy": "All",
        "schedulingPolicy": {"minAvailable": 4, "queue": "llm-queue", "priorityClass": "training-high"},
    }
    for rtype in ("Master", "Worker"):
        pod = pod_spec(job, rtype)
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == "ghcr.io/example/fljob:0.1.0"
        assert c["imagePullPolicy"] == "Always"
        assert c["resources"] == {"requests": {"cpu": "96", "memory": "900Gi", "nvidia.com/gpu": "8"},
                                  "limits": {"nvidia.com/gpu": "8"}}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "spec", "mountPath": "/etc/fljob", "readOnly": True} in c["volumeMounts"]
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 600}]
        assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
            "topologyKey"] == "kubernetes.io/hostname"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert (pod["priorityClassName"], pod["schedulerName"], pod["serviceAccountName"]) == (
            "training-high", "volcano", "fljob-trainer")
        assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
        assert pod["terminationGracePeriodSeconds"] == 300
        meta = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["metadata"]
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert meta["labels"]["team"] == "pretraining" and meta["labels"]["fljob.dev/role"] == rtype.lower()
    env = pod_spec(job)["containers"][0]["env"]
    assert env[:5] == [
        {"name": "FLJOB_JOB_NAME", "value": "mup-7b"}, {"name": "FLJOB_RUN_ID", "value": "mup-7b"},
        {"name": "FLJOB_BACKEND", "value": "k8s"}, {"name": "FLJOB_RUN_DIR", "value": "runs/mup-7b"},
        {"name": "FLJOB_SPEC", "value": "/etc/fljob/spec.yaml"}]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in env
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs == {"AWS_ACCESS_KEY_ID": {"name": "s3-credentials", "key": "access-key-id"},
                    "AWS_SECRET_ACCESS_KEY": {"name": "s3-credentials", "key": "secret-access-key"},
                    "WANDB_API_KEY": {"name": "wandb", "key": "api-key"}}
    # the ConfigMap carries the resolved spec the pods read
    assert load_spec_text(kinds["ConfigMap"]["data"]["spec.yaml"]).model_dump() == spec_of("gpu-4node").model_dump()


def test_metrics_service_and_podmonitor_select_only_the_master_pod_port() -> None:
    kinds = by_kind(docs_of(spec_of("gpu-4node")))
    replicas = kinds["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]
    master_labels = replicas["Master"]["template"]["metadata"]["labels"]
    worker_labels = replicas["Worker"]["template"]["metadata"]["labels"]
    selects = lambda sel, labels: all(labels.get(k) == v for k, v in sel.items())
    svc, pm = kinds["Service"], kinds["PodMonitor"]
    for selector in (svc["spec"]["selector"], pm["spec"]["selector"]["matchLabels"]):
        assert selects(selector, master_labels) and not selects(selector, worker_labels)
    master_ports = {p["name"]: p["containerPort"] for p in pod_spec(kinds["PyTorchJob"])["containers"][0]["ports"]}
    worker_ports = {p["name"] for p in pod_spec(kinds["PyTorchJob"], "Worker")["containers"][0]["ports"]}
    assert master_ports == {"pytorchjob-port": 23456, "metrics": 9470} and worker_ports == {"pytorchjob-port"}
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9470, "targetPort": "metrics", "protocol": "TCP"}]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert pm["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "honorLabels": True}]
    assert master_labels[pm["spec"]["jobLabel"]] == "mup-7b"


def test_one_node_job_has_no_worker_and_metrics_objects_follow_the_spec() -> None:
    docs = docs_of(spec_of("cpu-1node"))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob", "Service"]  # pod_monitor disabled
    job = by_kind(docs)["PyTorchJob"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert "ttlSecondsAfterFinished" not in job["spec"]["runPolicy"]
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    c = pod_spec(job)["containers"][0]
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"}}
    docs = docs_of(spec_of("cpu-1node", ["metrics.enabled=false"]))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    assert [p["name"] for p in pod_spec(docs[1])["containers"][0]["ports"]] == ["pytorchjob-port"]


def test_doctor_task_runs_the_distributed_preflight() -> None:
    job = by_kind(docs_of(spec_of("cpu-1node"), "doctor"))["PyTorchJob"]
    script = pod_spec(job)["containers"][0]["command"][2]
    assert '-- doctor --distributed "$FLJOB_SPEC" &' in script
    assert job["metadata"]["labels"]["fljob.dev/task"] == "doctor"


# --------------------------------------------------------------------------- check()


@pytest.mark.parametrize("change, fields, words", [
    ({"image": None}, "image", "set image"),
    ({"secret_env": {"HF_TOKEN": {"env": "HF_TOKEN"}}}, "secret_env.HF_TOKEN", "k8s_secret"),
    ({"storage": {"access_key_id": {"env": "AK"}, "secret_access_key": {"env": "SK"}}},
     "storage.access_key_id,storage.secret_access_key", "k8s_secret"),
    ({"env": {"MASTER_ADDR": "evil"}}, "env.MASTER_ADDR", "is set by the launcher"),
    ({"env": {"FLJOB_SPEC": "/tmp/other.yaml"}}, "env.FLJOB_SPEC", "is set by the launcher"),
    ({"kubernetes": {"labels": {"fljob.dev/role": "worker"}}}, "kubernetes.labels.fljob.dev/role",
     "sets this label itself"),
    ({"name": "n" * 52, "resources": {"nodes": 2000}}, "name", "63 characters"),
])
def test_check_names_the_field_and_the_fix(change: dict[str, Any], fields: str, words: str) -> None:
    spec = load_spec_text(yaml.safe_dump({"name": "bad", "image": "i", **change}), "spec.yaml")
    with pytest.raises(SpecError) as err:
        kubernetes_render.check(spec)
    assert [p.field for p in err.value.problems] == fields.split(",")
    for problem in err.value.problems:
        assert words in problem.message and problem.origin.startswith("spec.yaml:")


def test_golden_specs_pass_check() -> None:
    for stem in GOLDEN_SPECS:
        kubernetes_render.check(spec_of(stem))
    kubernetes_render.check(load_spec(REPO / "configs" / "kubernetes.yaml"))


# --------------------------------------------------------------------------- fljob's own schema


def all_rendered() -> list[list[dict[str, Any]]]:
    specs = [spec_of(stem) for stem in GOLDEN_SPECS] + [load_spec(REPO / "configs" / "kubernetes.yaml"),
                                                        spec_of("cpu-1node", ["metrics.enabled=false"])]
    return [kubernetes_render.objects(s) for s in specs]


def test_project_schema_is_json_schema_and_jsonschema_agrees_with_the_built_in_check() -> None:
    jsonschema.Draft202012Validator.check_schema(k8s_schema.SCHEMA)
    validator = jsonschema.Draft202012Validator(k8s_schema.SCHEMA)
    for docs in all_rendered():
        k8s_schema.validate(docs)
        for doc in docs:
            assert list(validator.iter_errors(doc)) == [] and k8s_schema.schema_errors(doc) == []


def _mutate(path: tuple[Any, ...], value: Any) -> list[dict[str, Any]]:
    docs = copy.deepcopy(kubernetes_render.objects(spec_of("gpu-4node")))
    node: Any = docs
    for part in path[:-1]:
        node = node[part]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return docs


MASTER = (1, "spec", "pytorchReplicaSpecs", "Master")
BROKEN = {  # what a renderer bug could produce -> the part of the message that says so
    "replicas as a string": (MASTER + ("replicas",), "2", "expected integer"),
    "two masters": (MASTER + ("replicas",), 2, "exactly 1 replica"),
    "container renamed": (MASTER + ("template", "spec", "containers", 0, "name"), "trainer", "'pytorch'"),
    "unknown field": (MASTER + ("template", "spec", "containers", 0, "comand"), ["x"], "unexpected field 'comand'"),
    "long name": ((1, "metadata", "name"), "x" * 64, "length 64"),
    "unknown replica type": ((1, "spec", "pytorchReplicaSpecs", "Chief"), {}, "unexpected field 'Chief'"),
    "bad restart policy": (MASTER + ("restartPolicy",), "Sometimes", "must be one of"),
    "env with value and valueFrom": (MASTER + ("template", "spec", "containers", 0, "env", 0, "valueFrom"),
                                     {"secretKeyRef": {"name": "s", "key": "k"}}, "fields is outside"),
    "no image": (MASTER + ("template", "spec", "containers", 0, "image"), KeyError, "image is required"),
    "service misses the master": ((2, "spec", "selector", "fljob.dev/role"), "worker", "does not select every job"),
    "podmonitor on a missing port": ((3, "spec", "podMetricsEndpoints", 0, "port"), "prom", "does not declare"),
    "configmap not mounted": (MASTER + ("template", "spec", "volumes", 1, "configMap", "name"), "other",
                              "not one rendered with it"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_render_fails_loudly_on_what_a_renderer_bug_could_produce(case: str) -> None:
    path, value, words = BROKEN[case]
    with pytest.raises(k8s_schema.RenderBug, match="a bug in fljob") as err:
        k8s_schema.validate(_mutate(path, value))
    assert words in str(err.value)


# --------------------------------------------------------------------------- official CRD


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Validator:
    return k8s_validation.crd_validator()


def test_pytorchjobs_pass_the_official_crd_schema(crd_validator: jsonschema.Validator) -> None:
    for docs in all_rendered():
        job = by_kind(docs)["PyTorchJob"]
        assert [e.message for e in crd_validator.iter_errors(job)] == []


def test_official_crd_check_would_catch_a_wrong_field(crd_validator: jsonschema.Validator) -> None:
    job = by_kind(kubernetes_render.objects(spec_of("gpu-4node")))["PyTorchJob"]
    job["spec"]["runPolicy"]["backofLimit"] = 3
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "1"
    messages = " | ".join(e.message for e in crd_validator.iter_errors(job))
    assert "'backofLimit' was unexpected" in messages and "'1' is not of type 'integer'" in messages


# --------------------------------------------------------------------------- Kubernetes OpenAPI


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pod_templates_configmap_and_service_pass_the_kubernetes_openapi_schema(version: str) -> None:
    for docs in all_rendered():
        kinds = by_kind(docs)
        for obj in [*k8s_validation.as_pod_templates(kinds["PyTorchJob"]), kinds["ConfigMap"], *docs[2:3]]:
            k8s_validation.openapi_validate(obj, version)


def test_kubernetes_openapi_check_would_catch_a_wrong_pod_field() -> None:
    (template,) = k8s_validation.as_pod_templates(by_kind(kubernetes_render.objects(spec_of("cpu-1node")))["PyTorchJob"])
    template["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountpath"] = "/dev/shm"
    with pytest.raises(kubernetes_validate.ValidationError, match="'mountpath' was unexpected"):
        kubernetes_validate.validate(template, K8S_VERSIONS[-1], strict=True)


@needs_kubectl
def test_kubectl_reads_the_manifest_and_the_kustomize_base(tmp_path: Path) -> None:
    """`kubectl kustomize` needs no server: it proves kubectl parses every document."""
    kubernetes_render.render(spec_of("gpu-4node"))[0].write(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [job.k8s.yaml]\n")
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert sorted(d["kind"] for d in yaml.safe_load_all(out)) == ["ConfigMap", "PodMonitor", "PyTorchJob", "Service"]
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s")], capture_output=True, text=True,
                         check=True).stdout
    base = list(yaml.safe_load_all(out))
    assert {(d["kind"], d["metadata"]["name"]) for d in base} == {("ServiceAccount", "fljob-trainer"),
                                                                  ("Role", "fljob-submitter")}
    for doc in base:
        k8s_validation.openapi_validate({**doc, "metadata": {**doc["metadata"], "namespace": "x"}}, K8S_VERSIONS[-1])


# --------------------------------------------------------------------------- the pod's program

FAKE_FLJOB = r"""#!/bin/sh
# Stands in for `fljob`: records its argv, then exits as told, or waits for SIGTERM.
printf '%s\n' "$@" > "$FAKE_OUT/argv"
if [ -n "${FAKE_WAIT_TERM:-}" ]; then
  trap 'echo term >> "$FAKE_OUT/signals"; exit "$FAKE_RC"' TERM
  touch "$FAKE_OUT/ready"
  i=0
  while [ "$i" -lt 300 ]; do sleep 0.05; i=$((i + 1)); done
  exit 99
fi
exit "${FAKE_RC:-0}"
"""


def start_pod(tmp_path: Path, spec: JobSpec, rtype: str = "Master", **env: str) -> subprocess.Popen[str]:
    """Run the container's command as the kubelet would, with the operator's variables."""
    job = by_kind(docs_of(spec))["PyTorchJob"]
    (container,) = pod_spec(job, rtype)["containers"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "fljob").write_text(FAKE_FLJOB)
    (bin_dir / "fljob").chmod(0o755)
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    operator_env = {"MASTER_ADDR": f"{spec.name}-master-0", "MASTER_PORT": "23456", "PET_NNODES": "4",
                    "PET_NODE_RANK": "2", "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_OUT": str(tmp_path)}
    return subprocess.Popen(container["command"], env={**pod_env, **operator_env, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pod_command_is_static_rendezvous_on_the_operator_variables(tmp_path: Path) -> None:
    proc = start_pod(tmp_path, spec_of("gpu-4node"), "Worker")
    assert proc.wait(10) == 0
    assert (tmp_path / "argv").read_text().splitlines() == [
        "launch", "--rdzv-backend=static", "--nnodes=4", "--node-rank=2", "--master-addr=mup-7b-master-0",
        "--master-port=23456", "--nproc-per-node=8", "--", "train", "/etc/fljob/spec.yaml"]


def test_pod_command_contains_nothing_kubernetes_would_expand() -> None:
    """Kubernetes rewrites $(VAR) and $$ in command/args; the script must use neither."""
    for stem in GOLDEN_SPECS:
        job = by_kind(docs_of(spec_of(stem)))["PyTorchJob"]
        for rspec in job["spec"]["pytorchReplicaSpecs"].values():
            script = rspec["template"]["spec"]["containers"][0]["command"][2]
            assert "$(" not in script and "$$" not in script


@pytest.mark.parametrize("rc, expected", [(0, 0), (1, 1), (3, 3), (REQUEUE, kubernetes_render.RETRYABLE_EXIT)])
def test_pod_exit_code_is_kept_except_requeue_which_becomes_retryable(tmp_path: Path, rc: int, expected: int) -> None:
    proc = start_pod(tmp_path, spec_of("cpu-1node"), FAKE_RC=str(rc))
    assert proc.wait(10) == expected


def test_sigterm_reaches_the_launcher_and_the_requeue_code_makes_the_pod_retryable(tmp_path: Path) -> None:
    proc = start_pod(tmp_path, spec_of("cpu-1node"), FAKE_WAIT_TERM="1", FAKE_RC=str(REQUEUE))
    deadline = time.monotonic() + 10
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == kubernetes_render.RETRYABLE_EXIT
    assert (tmp_path / "signals").read_text() == "term\n"
    assert "forwarding to the launcher" in proc.stderr.read()


def test_pod_without_the_operator_variables_stops_with_a_clear_message(tmp_path: Path) -> None:
    proc = start_pod(tmp_path, spec_of("cpu-1node"), PET_NODE_RANK="")
    assert proc.wait(10) == 2
    assert "must be set by the Kubeflow training operator" in proc.stderr.read()
    assert not (tmp_path / "argv").exists()


# --------------------------------------------------------------------------- secrets


def test_secret_values_never_reach_the_rendered_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    planted = {"SRC_ACCESS_KEY": "AKIAPLANTED0000000001", "SRC_SECRET_KEY": "planted/secret+value=42",
               "HF_TOKEN": "hf_plantedTokenValue123", "WANDB_API_KEY": "wandb-planted-987654"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    secret_file = tmp_path / "token"
    secret_file.write_text("file-planted-secret\n")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(f"""
name: leak-check
image: localhost/fljob:dev
run_dir: {tmp_path}/run
storage:
  access_key_id: {{env: SRC_ACCESS_KEY, k8s_secret: {{name: s3, key: id}}}}
  secret_access_key: {{env: SRC_SECRET_KEY, k8s_secret: {{name: s3, key: secret}}}}
secret_env:
  HF_TOKEN: {{env: HF_TOKEN, file: {secret_file}, k8s_secret: {{name: hf, key: token}}}}
  WANDB_API_KEY: {{env: WANDB_API_KEY, k8s_secret: {{name: wandb, key: api-key}}}}
""")
    out = tmp_path / "out"
    assert cli.main(["render", "--backend", "k8s", str(spec_path), "-o", str(out)]) == 0
    assert cli.main(["submit", "--backend", "k8s", "--dry-run", str(spec_path)]) == 0
    assert cli.main(["render", "--backend", "k8s", str(spec_path), "-o", "-"]) == 0
    written = [p for p in [*out.rglob("*"), *(tmp_path / "run").rglob("*")] if p.is_file()]
    assert [p.name for p in written] == ["job.k8s.yaml"]  # the dry run writes nothing
    texts = [p.read_text() for p in written] + [capsys.readouterr().out]
    for text in texts:
        for value in [*planted.values(), "file-planted-secret"]:
            assert value not in text
    env = pod_spec(by_kind(list(yaml.safe_load_all(texts[0])))["PyTorchJob"])["containers"][0]["env"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e} == {
        "AWS_ACCESS_KEY_ID": "s3", "AWS_SECRET_ACCESS_KEY": "s3", "HF_TOKEN": "hf", "WANDB_API_KEY": "wandb"}


# --------------------------------------------------------------------------- kubectl

HANDLE = Handle("k8s", "llm-training/mup-7b")


def test_kubectl_command_lines() -> None:
    assert kubernetes.apply_argv(Path("runs/mup-7b/job.k8s.yaml")) == [
        "kubectl", "apply", "-f", "runs/mup-7b/job.k8s.yaml"]
    assert kubernetes.status_argv(HANDLE) == [
        "kubectl", "get", "pytorchjob", "-n", "llm-training", "mup-7b", "-o", "json"]
    assert kubernetes.sweep_status_argv(HANDLE) == [
        "kubectl", "get", "pytorchjobs", "-n", "llm-training", "-l", "fljob.dev/sweep=mup-7b", "-o", "json"]
    assert kubernetes.logs_argv(HANDLE) == ["kubectl", "logs", "-n", "llm-training", "mup-7b-master-0", "-c", "pytorch"]
    assert kubernetes.logs_argv(HANDLE, follow=True)[-1] == "-f"
    assert kubernetes.cancel_argv(HANDLE) == ["kubectl", "delete", "pytorchjob", "-n", "llm-training", "mup-7b"]
    assert kubernetes.cancel_argv(HANDLE, sweep=True) == [
        "kubectl", "delete", "pytorchjobs", "-n", "llm-training", "-l", "fljob.dev/sweep=mup-7b"]


def operator_status(job: dict[str, Any], *conditions: tuple[str, str, str]) -> dict[str, Any]:
    """``job`` as the API server returns it once the training operator (v1.9) has written its
    status: conditions in the order it appends them, each (type, status, reason)."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    words = {"Created": "created", "Running": "running", "Restarting": "restarting",
             "Succeeded": "successfully completed", "Failed": "failed because 1 Master replica(s) failed",
             "Suspended": "suspended"}
    stamp = "2026-12-03T06:00:00Z"
    return {**job, "metadata": {**job["metadata"], "uid": "0b1c", "resourceVersion": "4711",
                                "creationTimestamp": stamp, "generation": 1},
            "status": {"conditions": [
                {"type": kind, "status": state, "reason": reason, "lastUpdateTime": stamp,
                 "lastTransitionTime": stamp, "message": f"PyTorchJob {namespace}/{name} is {words[kind]}."}
                for kind, state, reason in conditions],
                "replicaStatuses": {"Master": {"active": 1}}, "startTime": stamp}}


@pytest.fixture
def standin_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put tests/k8s_standin/kubectl first on PATH, replaying the objects a test records."""
    calls = tmp_path / "kubectl.calls"
    recorded = tmp_path / "recorded.json"
    monkeypatch.setenv("PATH", f"{REPO / 'tests' / 'k8s_standin'}:{os.environ['PATH']}")
    monkeypatch.setenv("KUBECTL_CALLS", str(calls))
    monkeypatch.setenv("KUBECTL_RECORDED", str(recorded))

    def record(objects: list[dict[str, Any]], logs: str = "") -> Path:
        recorded.write_text(json.dumps(objects))
        monkeypatch.setenv("KUBECTL_LOGS", logs)
        return calls

    return record


@pytest.mark.parametrize("conditions, state, reason", [
    ((), "PENDING", None),
    ((("Created", "True", "PyTorchJobCreated"),), "PENDING", "PyTorchJobCreated"),
    ((("Created", "True", "PyTorchJobCreated"), ("Suspended", "True", "PyTorchJobSuspended")), "PENDING",
     "PyTorchJobSuspended"),
    ((("Created", "True", "PyTorchJobCreated"), ("Running", "True", "PyTorchJobRunning")), "RUNNING",
     "PyTorchJobRunning"),
    ((("Created", "True", "PyTorchJobCreated"), ("Running", "False", "PyTorchJobRunning"),
      ("Restarting", "True", "PyTorchJobRestarting")), "REQUEUED", "PyTorchJobRestarting"),
    ((("Created", "True", "PyTorchJobCreated"), ("Running", "False", "PyTorchJobRunning"),
      ("Succeeded", "True", "PyTorchJobSucceeded")), "COMPLETED", "PyTorchJobSucceeded"),
    ((("Created", "True", "PyTorchJobCreated"), ("Running", "False", "PyTorchJobRunning"),
      ("Failed", "True", "PyTorchJobFailed")), "FAILED", "PyTorchJobFailed"),
])
def test_status_maps_the_operators_conditions(standin_kubectl, conditions, state: str, reason: str | None) -> None:
    job = by_kind(kubernetes_render.objects(spec_of("gpu-4node")))["PyTorchJob"]
    calls = standin_kubectl([operator_status(job, *conditions) if conditions else job])
    found = kubernetes.status(HANDLE)
    assert found.state.value == state
    assert found.line().startswith(f"k8s://llm-training/mup-7b {state} ")
    assert (reason is None) == ("reason=" not in found.line())
    if reason:
        assert dict(found.details)["reason"].startswith(f"{reason}: PyTorchJob llm-training/mup-7b is")
    assert calls.read_text().splitlines() == [" ".join(kubernetes.sweep_status_argv(HANDLE)[1:]),
                                              " ".join(kubernetes.status_argv(HANDLE)[1:])]


def test_dry_run_shows_the_manifest_and_the_command_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["submit", "--backend", "k8s", "--dry-run", str(GOLDEN / "gpu-4node.spec.yaml")]) == 0
    out = capsys.readouterr().out
    assert "would write into" in out and "  job.k8s.yaml" in out
    assert f"then run: kubectl apply -f {tmp_path}/runs/mup-7b/job.k8s.yaml" in out
    assert "handle: k8s://llm-training/mup-7b" in out
    assert not (tmp_path / "runs").exists()
    plan = kubernetes.plan(spec_of("gpu-4node"))
    assert plan.files[0].content == (GOLDEN / "gpu-4node.train.k8s.yaml").read_text()


def test_submit_applies_exactly_the_manifest_and_returns_the_handle(tmp_path: Path, standin_kubectl,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls = standin_kubectl([])
    # apply is not a command the stand-in replays: it answers with exit 2, a KubectlError.
    with pytest.raises(kubernetes.KubectlError, match="unexpected command"):
        kubernetes.submit(kubernetes.plan(spec_of("gpu-4node")))
    assert calls.read_text().splitlines() == [f"apply -f {tmp_path}/runs/mup-7b/job.k8s.yaml"]
    assert (tmp_path / "runs/mup-7b/job.k8s.yaml").read_text() == (GOLDEN / "gpu-4node.train.k8s.yaml").read_text()


def test_logs_and_cancel_run_their_command_lines(standin_kubectl) -> None:
    job = by_kind(kubernetes_render.objects(spec_of("gpu-4node")))["PyTorchJob"]
    log = "fljob: node 0 of 4, rendezvous mup-7b-master-0:23456\nstep 1/10 loss 9.2\n"
    calls = standin_kubectl([operator_status(job, ("Created", "True", "PyTorchJobCreated"))], logs=log)
    assert "".join(kubernetes.logs(HANDLE, follow=True)) == log
    kubernetes.cancel(HANDLE)
    with pytest.raises(kubernetes.KubectlError, match="NotFound"):
        kubernetes.status(HANDLE)
    assert calls.read_text().splitlines()[:3] == [
        " ".join(argv[1:]) for argv in (kubernetes.logs_argv(HANDLE, follow=True), kubernetes.sweep_status_argv(HANDLE),
                                        kubernetes.cancel_argv(HANDLE))]


def test_sweep_status_is_a_table_of_trials_and_cancel_deletes_them_all(standin_kubectl) -> None:
    spec = spec_of("cpu-1node", ["sweep={grid: {optimizer.lr: [0.001, 0.002, 0.004]}, parallel: 3}"])
    jobs = [d for d in kubernetes_render.objects(spec) if d["kind"] == "PyTorchJob"]
    conditions = [[("Created", "True", "PyTorchJobCreated"), ("Succeeded", "True", "PyTorchJobSucceeded")],
                  [("Created", "True", "PyTorchJobCreated"), ("Running", "True", "PyTorchJobRunning")],
                  [("Created", "True", "PyTorchJobCreated"), ("Failed", "True", "PyTorchJobFailed")]]
    other = by_kind(kubernetes_render.objects(spec_of("gpu-4node")))["PyTorchJob"]
    # Recorded in another order than the trials': status sorts them by trial index.
    calls = standin_kubectl([operator_status(j, *c) for j, c in reversed(list(zip(jobs, conditions)))] + [other])
    handle = Handle("k8s", f"dev/{spec.name}")
    found = kubernetes.status(handle)
    assert [t.name for t in found.trials] == [j["metadata"]["name"] for j in jobs]
    assert [t.state.value for t in found.trials] == ["COMPLETED", "RUNNING", "FAILED"]
    assert found.line().splitlines()[0] == f"k8s://dev/{spec.name} SWEEP {spec.name}: 3 trials: " \
                                           "1 COMPLETED, 1 RUNNING, 1 FAILED"
    assert json.loads(json.dumps(found.to_json()))["counts"] == {"COMPLETED": 1, "RUNNING": 1, "FAILED": 1}
    kubernetes.cancel(handle)
    assert calls.read_text().splitlines()[-1] == " ".join(kubernetes.cancel_argv(handle, sweep=True)[1:])
    assert [o["metadata"]["name"] for o in json.loads(Path(os.environ["KUBECTL_RECORDED"]).read_text())] == ["mup-7b"]


def test_kubectl_failure_is_a_usage_error_with_kubectls_words(standin_kubectl) -> None:
    standin_kubectl([])
    with pytest.raises(kubernetes.KubectlError, match="NotFound") as err:
        kubernetes.status(HANDLE)
    assert "kubectl get pytorchjob -n llm-training mup-7b -o json" in str(err.value)
    assert cli.main(["status", str(HANDLE)]) == 2


@needs_kubectl
def test_unreachable_cluster_gives_exit_2_and_a_message_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real kubectl against a closed port: there is no API server on this machine."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "users": [{"name": "none", "user": {"token": "not-a-token"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    done = subprocess.run([sys.executable, "-m", "fljob.cli", "status", "k8s://llm-training/mup-7b"],
                          check=False, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "fljob status: `kubectl get pytorchjobs -n llm-training -l fljob.dev/sweep=mup-7b -o json`" in done.stderr
    assert "127.0.0.1:9" in done.stderr and "kubectl config current-context" in done.stderr


def test_missing_kubectl_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="kubectl is not on PATH"):
        kubernetes.cancel(HANDLE)


# --------------------------------------------------------------------------- CLI and start-up


def test_render_imports_nothing_heavy() -> None:
    """`fljob render` must start fast: no torch, no jsonschema, no kubernetes client on its path."""
    code = ("import sys; from fljob import cli; cli.main(['render', '--backend', 'k8s', sys.argv[1], '-o', '-']); "
            "heavy = {'torch', 'jsonschema', 'kubernetes_validate', 'kubernetes', 'submitit'} & set(sys.modules); "
            "print(sorted(heavy), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(GOLDEN / "gpu-4node.spec.yaml")],
                          capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "[]"
    assert done.stdout == "# ---- job.k8s.yaml\n" + (GOLDEN / "gpu-4node.train.k8s.yaml").read_text()


# --------------------------------------------------------------------------- Trainer v2: TrainJob

TRAINJOB_CRD = k8s_validation.CRD_DIR / "trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
RUNTIME_CRD = k8s_validation.CRD_DIR / "trainer.kubeflow.org_clustertrainingruntimes.v2.3.0.yaml"
RUNTIME = REPO / "k8s" / "trainjob-runtime.yaml"


def trainjob_spec(*overrides: str) -> JobSpec:
    return spec_of("gpu-4node", ["kubernetes.api=trainjob", "kubernetes.priority_class=null",
                                 "kubernetes.scheduler_name=null", "kubernetes.image_pull_policy=IfNotPresent",
                                 "kubernetes.backoff_limit=3", "kubernetes.labels={team: pretraining}", *overrides])


def node_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The `node` pod Trainer v2 creates: the runtime's template, the TrainJob's trainer fields
    and its runtime patch merged as the Trainer's controller does (container by name)."""
    runtime = yaml.safe_load(RUNTIME.read_text())
    (runtime_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(runtime_job["template"]["spec"]["template"])
    (patch,) = job["spec"]["runtimePatches"]
    (patched,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    overlay = patched["template"]["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(overlay["metadata"]["labels"])
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    for c in overlay["spec"]["containers"]:
        containers[c["name"]].update(c)
    pod["spec"].update({k: v for k, v in overlay["spec"].items() if k != "containers"})
    trainer = job["spec"]["trainer"]
    node = containers[kubernetes_render.TRAINJOB_NODE]
    node.update(image=trainer["image"], command=trainer["command"], env=trainer["env"],
                resources=trainer.get("resourcesPerNode", {}))
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "node", "namespace": "x"}, "template": pod}


def test_trainjob_passes_the_official_v2_crds_and_its_pod_the_openapi_schema() -> None:
    spec = trainjob_spec()
    docs = docs_of(spec)
    assert [d["kind"] for d in docs] == ["ConfigMap", "TrainJob", "PodMonitor"]
    job = by_kind(docs)["TrainJob"]
    validator = k8s_validation.crd_validator(TRAINJOB_CRD, "v1alpha1")
    assert [e.message for e in validator.iter_errors(job)] == []
    runtime = yaml.safe_load(RUNTIME.read_text())
    assert runtime["metadata"]["name"] == job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert [e.message for e in k8s_validation.crd_validator(RUNTIME_CRD, "v1alpha1").iter_errors(runtime)] == []
    for version in K8S_VERSIONS:
        k8s_validation.openapi_validate(node_pod(job), version)
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    pod = node_pod(job)["template"]["spec"]
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "spot"]
    assert pod["affinity"]["podAntiAffinity"] and pod["serviceAccountName"] == "fljob-trainer"
    # The PodMonitor finds node rank 0 by the labels the Job and JobSet controllers add.
    monitor = by_kind(docs)["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"]["batch.kubernetes.io/job-completion-index"] == "0"
    assert monitor["podMetricsEndpoints"][0]["targetPort"] == 9470


def test_trainjob_refuses_what_only_the_runtime_can_set() -> None:
    with pytest.raises(SpecError) as err:
        kubernetes_render.check(spec_of("gpu-4node", ["kubernetes.api=trainjob"]))
    fields = sorted(p.field for p in err.value.problems)
    assert fields == ["kubernetes.backoff_limit", "kubernetes.image_pull_policy", "kubernetes.priority_class",
                      "kubernetes.scheduler_name"]
    assert all("ClusterTrainingRuntime" in p.message for p in err.value.problems)


def test_trainjob_with_kueue_and_as_a_sweep(standin_kubectl) -> None:
    spec = trainjob_spec("kubernetes.queue=llm", "sweep={grid: {optimizer.lr: [0.001, 0.002]}, parallel: 1}")
    docs = [d for d in kubernetes_render.objects(spec)]
    jobs = [d for d in docs if d["kind"] == "TrainJob"]
    assert [j["metadata"]["name"] for j in jobs] == ["mup-7b-0", "mup-7b-1"]
    assert all(j["spec"]["suspend"] and j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "llm" for j in jobs)
    validator = k8s_validation.crd_validator(TRAINJOB_CRD, "v1alpha1")
    assert [e.message for j in jobs for e in validator.iter_errors(j)] == []
    handle = kubernetes.plan(spec).handle
    assert str(handle) == "k8s://llm-training/trainjob/mup-7b"
    stamp = "2026-12-03T06:00:00Z"
    recorded = [
        {**jobs[0], "status": {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                               "message": "jobset completed", "lastTransitionTime": stamp}]}},
        {**jobs[1], "status": {"jobsStatus": [{"name": "node", "active": 4, "ready": 4, "succeeded": 0,
                                               "failed": 0, "suspended": 0}]}},
    ]
    calls = standin_kubectl(recorded)
    found = kubernetes.status(handle)
    assert [(t.name, t.state.value) for t in found.trials] == [("mup-7b-0", "COMPLETED"), ("mup-7b-1", "RUNNING")]
    assert calls.read_text().splitlines() == ["get trainjobs -n llm-training -l fljob.dev/sweep=mup-7b -o json"]
    assert kubernetes.logs_argv(Handle("k8s", "llm-training/trainjob/mup-7b-1")) == [
        "kubectl", "logs", "-n", "llm-training", "-l",
        "jobset.sigs.k8s.io/jobset-name=mup-7b-1,batch.kubernetes.io/job-completion-index=0", "-c", "node",
        "--tail=-1"]


def test_trainjob_pod_rendezvous_on_the_trainer_variables_and_keeps_the_requeue_code(tmp_path: Path) -> None:
    job = by_kind(docs_of(trainjob_spec()))["TrainJob"]
    trainer = job["spec"]["trainer"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fljob").write_text(FAKE_FLJOB)
    (bin_dir / "fljob").chmod(0o755)
    env = {**{e["name"]: e["value"] for e in trainer["env"] if "value" in e},
           "PET_MASTER_ADDR": "mup-7b-node-0-0.mup-7b", "PET_MASTER_PORT": "29400", "PET_NNODES": "4",
           "PET_NODE_RANK": "1", "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_OUT": str(tmp_path),
           "FAKE_RC": str(REQUEUE)}
    proc = subprocess.run(trainer["command"], env=env, capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == REQUEUE  # the JobSet's failure policy restarts it
    assert (tmp_path / "argv").read_text().splitlines()[3:6] == [
        "--node-rank=1", "--master-addr=mup-7b-node-0-0.mup-7b", "--master-port=29400"]
