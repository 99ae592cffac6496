"""Kubernetes fields of the spec: what `fljob validate` accepts, the cluster accepts.

Two halves. Examples of what the API server's pod validation rejects although the PyTorchJob
CRD schema lets it through (tolerations, affinity, names): `fljob validate` must refuse each
with the field named. And a property over generated Kubernetes sections: whenever validate
accepts, the backend's check accepts, render succeeds (no RenderBug), and every object
passes the official CRD schema and the Kubernetes OpenAPI schema.
"""

from __future__ import annotations

import copy
from typing import Any

import k8s_validation
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fljob.backends import kubernetes_render
from fljob.spec import SpecError, load_spec_text
from fljob.spec.k8s_fields import KUEUE_QUEUE_LABEL

BASE: dict[str, Any] = {"name": "k8s-fields", "image": "localhost/fljob:dev"}


def load(kubernetes: dict[str, Any], **more: Any) -> Any:
    return load_spec_text(yaml.safe_dump({**BASE, "kubernetes": kubernetes, **more}), "spec.yaml")


def tolerations(*items: dict[str, Any]) -> dict[str, Any]:
    return {"tolerations": list(items)}


def node_terms(*expressions: dict[str, Any]) -> dict[str, Any]:
    return {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": list(expressions)}]}}}}


def pod_anti(term: dict[str, Any]) -> dict[str, Any]:
    return {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}


REJECTED = [
    (tolerations({"key": "gpu", "operator": "Exists", "value": "true"}), "kubernetes.tolerations[0]",
     "operator Exists takes no value"),
    (tolerations({"key": "spot", "value": "1", "effect": "NoSchedule", "toleration_seconds": 60}),
     "kubernetes.tolerations[0]", "toleration_seconds applies only to effect NoExecute"),
    (tolerations({"operator": "Equal", "value": "x"}), "kubernetes.tolerations[0]", "must use operator Exists"),
    (tolerations({"key": "bad key!", "operator": "Exists"}), "kubernetes.tolerations[0].key",
     "not a valid Kubernetes key"),
    (tolerations({"key": "gpu", "effect": "NoRun"}), "kubernetes.tolerations[0].effect", "is not allowed"),
    (tolerations({"key": "gpu", "value": "no spaces allowed"}), "kubernetes.tolerations[0]", "label value"),
    ({"affinity": {"nodeAfinity": {}}}, "kubernetes.affinity.nodeAfinity", "Did you mean 'nodeAffinity'"),
    (node_terms({"key": "zone", "operator": "In"}), "kubernetes.affinity.nodeAffinity", "at least one value"),
    (node_terms({"key": "zone", "operator": "Exists", "values": ["a"]}), "kubernetes.affinity.nodeAffinity",
     "takes no values"),
    (node_terms({"key": "gpus", "operator": "Gt", "values": ["many"]}), "kubernetes.affinity.nodeAffinity",
     "one integer value"),
    (node_terms({"key": "zone", "operator": "Near", "values": ["a"]}), "kubernetes.affinity.nodeAffinity",
     "is not allowed"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}},
     "kubernetes.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
     "at least 1 item"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": {"matchExpressions": []}}}}},
     "kubernetes.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
     "valid list"),
    (pod_anti({"labelSelector": {"matchLabels": {"app": "x"}}}), "kubernetes.affinity.podAntiAffinity",
     "required field is missing"),
    (pod_anti({"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchExpressions": [
        {"key": "app", "operator": "Gt", "values": ["1"]}]}}), "kubernetes.affinity.podAntiAffinity",
     "is not allowed"),
    ({"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}]}}}, "kubernetes.affinity.podAffinity",
     "greater than or equal to 1"),
    ({"service_account": "Bad_SA"}, "kubernetes.service_account", "DNS-1123 subdomain"),
    ({"priority_class": "High Priority"}, "kubernetes.priority_class", "DNS-1123 subdomain"),
    ({"scheduler_name": "My-Scheduler"}, "kubernetes.scheduler_name", "DNS-1123 subdomain"),
    ({"image_pull_secrets": ["ok", "not_ok"]}, "kubernetes.image_pull_secrets", "DNS-1123 subdomain"),
    ({"annotations": {"bad key": "x"}}, "kubernetes.annotations", "not a valid Kubernetes key"),
    ({"labels": {"team": "a b"}}, "kubernetes.labels", "label value"),
    ({"pod_monitor": {"interval": "15 sec"}}, "kubernetes.pod_monitor.interval", "Prometheus duration"),
    ({"queue": "Team_Queue"}, "kubernetes.queue", "DNS-1123 subdomain"),
    ({"queue": "llm", "labels": {KUEUE_QUEUE_LABEL: "llm"}}, "kubernetes", "set the Kueue queue once"),
]


@pytest.mark.parametrize("kubernetes, field, words", REJECTED, ids=[w for _, _, w in REJECTED])
def test_validate_refuses_what_the_api_server_would(kubernetes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        load(kubernetes)
    problems = err.value.problems
    assert any(p.field.startswith(field) and words in p.message for p in problems), \
        "\n".join(str(p) for p in problems)
    assert all(p.origin.startswith("spec.yaml:") for p in problems)


def test_the_service_account_example_is_an_exit_2_not_a_render_bug(tmp_path, capsys) -> None:
    from fljob import cli

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "kubernetes": {"service_account": "Bad_SA"}}))
    for command in (["validate", "--backend", "k8s"], ["render", "--backend", "k8s", "-o", "-"]):
        assert cli.main([*command, str(spec)]) == 2
        err = capsys.readouterr().err
        assert "kubernetes.service_account" in err and "RenderBug" not in err and "Traceback" not in err


def test_kueue_queue_is_a_label_and_the_job_starts_suspended() -> None:
    (job,) = [d for d in kubernetes_render.objects(load({"queue": "team-a"})) if d["kind"] == "PyTorchJob"]
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["runPolicy"]["suspend"] is True and "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert [e.message for e in k8s_validation.crd_validator().iter_errors(job)] == []
    volcano = next(d for d in kubernetes_render.objects(load({"queue": "team-a", "scheduler_name": "volcano"}))
                   if d["kind"] == "PyTorchJob")
    assert volcano["spec"]["runPolicy"]["schedulingPolicy"]["queue"] == "team-a"
    assert KUEUE_QUEUE_LABEL not in volcano["metadata"]["labels"] and "suspend" not in volcano["spec"]["runPolicy"]


def test_a_throttled_sweep_needs_a_queue() -> None:
    sweep = {"grid": {"optimizer.lr": [0.001, 0.002, 0.004]}, "parallel": 2}
    with pytest.raises(SpecError, match="set kubernetes.queue to a Kueue LocalQueue"):
        kubernetes_render.check(load({}, sweep=sweep))
    objects = kubernetes_render.objects(load({"queue": "sweeps"}, sweep=sweep))
    jobs = [d for d in objects if d["kind"] == "PyTorchJob"]
    assert len(jobs) == 3 and all(j["spec"]["runPolicy"]["suspend"] for j in jobs)
    assert [e.message for j in jobs for e in k8s_validation.crd_validator().iter_errors(j)] == []
    for obj in [t for j in jobs for t in k8s_validation.as_pod_templates(j)] + \
            [d for d in objects if d["kind"] == "ConfigMap"]:
        k8s_validation.openapi_validate(obj, k8s_validation.K8S_VERSIONS[-1])
    assert {j["metadata"]["labels"]["fljob.dev/sweep"] for j in jobs} == {"k8s-fields"}
    assert [d["kind"] for d in objects].count("PodMonitor") == 1


# --------------------------------------------------------------------------- the property

LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9._-]{0,10}[a-z0-9])?\Z")
NAME = st.from_regex(r"\A[a-z]([a-z0-9-]{0,10}[a-z0-9])?\Z")
# Mostly well-formed values (three branches in four), sometimes not: the property holds either way,
# and enough generated specs are accepted to exercise render with tolerations and affinity.
BAD_WORD = st.sampled_from(["", "Bad_Name", "a b", "-x", "x" * 70, "a.b/c"])
WORD = st.one_of(LABEL, LABEL, NAME, BAD_WORD)
KEY = st.one_of(LABEL, NAME, st.builds(lambda p, n: f"{p}/{n}", NAME, LABEL),
                st.sampled_from(["bad key", "", "a/b/c"]))
VALUES = st.lists(st.one_of(WORD, st.integers(-5, 99).map(str)), max_size=3)


def _expression(selector: bool) -> st.SearchStrategy[dict[str, Any]]:
    listed = st.fixed_dictionaries({"key": KEY, "operator": st.sampled_from(["In", "NotIn"]),
                                    "values": st.lists(LABEL, min_size=1, max_size=2)})
    bare = st.fixed_dictionaries({"key": KEY, "operator": st.sampled_from(["Exists", "DoesNotExist"])})
    numeric = st.fixed_dictionaries({"key": KEY, "operator": st.sampled_from(["Gt", "Lt"]),
                                     "values": st.lists(st.integers(0, 9).map(str), min_size=1, max_size=1)})
    operators = ["In", "NotIn", "Exists", "DoesNotExist"] + ([] if selector else ["Gt", "Lt"])
    anything = st.fixed_dictionaries({"key": KEY, "operator": st.sampled_from(operators)}, optional={"values": VALUES})
    return st.one_of(listed, bare, anything, *(() if selector else (numeric,)))


TOLERATION = st.one_of(
    st.fixed_dictionaries({"key": KEY, "operator": st.just("Exists")},
                          optional={"effect": st.sampled_from(["NoSchedule", "PreferNoSchedule"])}),
    st.fixed_dictionaries({"key": KEY, "value": LABEL, "effect": st.just("NoExecute")},
                          optional={"toleration_seconds": st.integers(0, 3600)}),
    st.fixed_dictionaries({}, optional={
        "key": KEY, "operator": st.sampled_from(["Exists", "Equal"]), "value": WORD,
        "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        "toleration_seconds": st.integers(0, 3600)}))
LABEL_SELECTOR = st.fixed_dictionaries({}, optional={
    "matchLabels": st.dictionaries(KEY, WORD, max_size=2), "matchExpressions": st.lists(_expression(True), max_size=2)})
POD_TERM = st.fixed_dictionaries({"topologyKey": KEY}, optional={
    "labelSelector": LABEL_SELECTOR, "namespaces": st.lists(WORD, max_size=2)})
POD_AFFINITY = st.fixed_dictionaries({}, optional={
    "requiredDuringSchedulingIgnoredDuringExecution": st.lists(POD_TERM, max_size=2),
    "preferredDuringSchedulingIgnoredDuringExecution": st.lists(st.fixed_dictionaries(
        {"weight": st.integers(0, 101), "podAffinityTerm": POD_TERM}), max_size=2)})
NODE_TERM = st.fixed_dictionaries({}, optional={"matchExpressions": st.lists(_expression(False), max_size=2)})
AFFINITY = st.fixed_dictionaries({}, optional={
    "nodeAffinity": st.fixed_dictionaries({}, optional={
        "requiredDuringSchedulingIgnoredDuringExecution": st.fixed_dictionaries(
            {"nodeSelectorTerms": st.lists(NODE_TERM, max_size=2)}),
        "preferredDuringSchedulingIgnoredDuringExecution": st.lists(st.fixed_dictionaries(
            {"weight": st.integers(0, 101), "preference": NODE_TERM}), max_size=2)}),
    "podAffinity": POD_AFFINITY, "podAntiAffinity": POD_AFFINITY})
KUBERNETES = st.fixed_dictionaries({}, optional={
    "namespace": WORD, "service_account": WORD, "priority_class": WORD, "scheduler_name": WORD, "queue": WORD,
    "node_selector": st.dictionaries(KEY, WORD, max_size=2), "labels": st.dictionaries(KEY, WORD, max_size=2),
    "annotations": st.dictionaries(KEY, st.text(max_size=20), max_size=2),
    "image_pull_secrets": st.lists(WORD, max_size=2), "tolerations": st.lists(TOLERATION, max_size=3),
    "affinity": AFFINITY, "pod_monitor": st.fixed_dictionaries({}, optional={
        "interval": st.sampled_from(["15s", "1m", "1h30m", "15 sec", "", "5"]),
        "labels": st.dictionaries(KEY, WORD, max_size=1)})})
# The same pod-scheduling fields alone, so that many accepted specs carry them.
SCHEDULING = st.fixed_dictionaries({"tolerations": st.lists(TOLERATION, min_size=1, max_size=3)},
                                   optional={"affinity": AFFINITY})


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kubernetes=st.one_of(KUBERNETES, SCHEDULING), nodes=st.integers(1, 3))
def test_validate_accepts_implies_render_succeeds_and_the_schemas_accept(kubernetes: dict[str, Any],
                                                                         nodes: int) -> None:
    crd = k8s_validation.crd_validator()
    try:
        spec = load(copy.deepcopy(kubernetes), resources={"nodes": nodes})
        kubernetes_render.check(spec)
    except SpecError:
        return  # refused with a message naming the field: fine
    objects = kubernetes_render.objects(spec)
    kubernetes_render.render(spec)  # fljob's own schema and the webhook rules: a RenderBug would fail here
    job = next(d for d in objects if d["kind"] == "PyTorchJob")
    assert [e.message for e in crd.iter_errors(job)] == []
    for obj in [*k8s_validation.as_pod_templates(job), *(d for d in objects if d["kind"] in ("ConfigMap", "Service"))]:
        k8s_validation.openapi_validate(obj, k8s_validation.K8S_VERSIONS[-1])
