"""The project's own schema of the Kubernetes objects fljob renders, checked inside `render`.

No API server is at hand when rendering (nor in CI), and `kubectl --dry-run=client` needs one,
so a wrong manifest would only be found at `kubectl apply` time, or worse, silently pruned.
`SCHEMA` is a JSON Schema (draft 2020-12) of exactly the fields the renderer writes, closed
with ``additionalProperties: false``; `validate` checks objects against it with a small
built-in interpreter of the keywords used here, so that `fljob render` stays fast and needs no
jsonschema. The tests check the same schema with the real jsonschema, and the rendered objects
against the official PyTorchJob CRD and the Kubernetes OpenAPI schema.

On top of the schema come the rules of the training operator's admission webhook (which no
schema expresses) and the cross references between the objects (selectors, volume names).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fljob.spec.k8s_fields import DNS1123_SUBDOMAIN, LABEL_KEY, LABEL_VALUE, PROM_DURATION
from fljob.spec.models import DNS1035, ENV_NAME, K8S_QUANTITY

CONTAINER_NAME = "pytorch"  # the webhook requires a container of this name in every replica
TRAINJOB_NODE = "node"  # a TrainJob's torch runtime: the replicated job and container that train
REPLICA_TYPES = ("Master", "Worker")
# IANA service name: what a named container port may be called.
PORT_NAME = r"^(?=.{1,15}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """A closed object: every field fljob writes is listed, nothing else may appear."""
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return {**out, **extra}


def _array(items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **extra}


_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NONNEG = {"type": "integer", "minimum": 0}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

DEFS: dict[str, Any] = {
    "dns1035": {"type": "string", "maxLength": 63, "pattern": DNS1035.pattern},
    "dns1123subdomain": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN.pattern},
    "quantity": {"type": "string", "pattern": K8S_QUANTITY.pattern},
    "labels": {"type": "object", "propertyNames": {"pattern": LABEL_KEY.pattern},
               "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE.pattern}},
    "annotations": {"type": "object", "propertyNames": {"pattern": LABEL_KEY.pattern},
                    "additionalProperties": _STR},
    "metadata": _obj({"name": _ref("dns1035"), "namespace": _ref("dns1035"), "labels": _ref("labels"),
                      "annotations": _ref("annotations")}, ("name", "namespace", "labels")),
    "envVar": _obj({
        "name": {"type": "string", "pattern": ENV_NAME.pattern},
        "value": _STR,
        "valueFrom": _obj({
            "secretKeyRef": _obj({"name": _ref("dns1123subdomain"),
                                  "key": {"type": "string", "pattern": r"^[-._a-zA-Z0-9]+$"}}, ("name", "key")),
        }, ("secretKeyRef",)),
    }, ("name",), minProperties=2, maxProperties=2),  # a name and exactly one of value/valueFrom
    "container": _obj({
        "name": {"const": CONTAINER_NAME},
        "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": _array(_STR, minItems=1),
        "env": _array(_ref("envVar")),
        "ports": _array(_obj({"name": {"type": "string", "pattern": PORT_NAME}, "containerPort": _PORT,
                              "protocol": {"const": "TCP"}}, ("name", "containerPort", "protocol")), minItems=1),
        "resources": _ref("resources"),
        "volumeMounts": _array(_obj({"name": _ref("dns1035"), "mountPath": {"type": "string", "pattern": "^/"},
                                     "readOnly": _BOOL}, ("name", "mountPath"))),
    }, ("name", "image", "command", "env", "ports", "volumeMounts")),
    "volume": _obj({
        "name": _ref("dns1035"),
        "emptyDir": _obj({"medium": {"const": "Memory"}, "sizeLimit": _ref("quantity")}, ("medium",)),
        "configMap": _obj({"name": _ref("dns1123subdomain"),
                           "items": _array(_obj({"key": _STR, "path": _STR}, ("key", "path")))}, ("name",)),
    }, ("name",), minProperties=2, maxProperties=2),  # a name and exactly one source
    "toleration": _obj({"key": _STR, "operator": {"enum": ["Exists", "Equal"]}, "value": _STR,
                        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                        "tolerationSeconds": {"type": "integer"}}),
    # The spec's affinity is passed through; the Kubernetes OpenAPI schema checks its inside.
    "affinity": {"type": "object", "minProperties": 1,
                 "propertyNames": {"enum": ["nodeAffinity", "podAffinity", "podAntiAffinity"]},
                 "additionalProperties": {"type": "object"}},
    "podSpec": _obj({
        "containers": _array(_ref("container"), minItems=1, maxItems=1),
        "volumes": _array(_ref("volume"), minItems=1),
        "terminationGracePeriodSeconds": _NONNEG,
        "automountServiceAccountToken": _BOOL,
        "serviceAccountName": _ref("dns1123subdomain"),
        "nodeSelector": _ref("labels"),
        "tolerations": _array(_ref("toleration")),
        "affinity": _ref("affinity"),
        "priorityClassName": _ref("dns1123subdomain"),
        "schedulerName": _ref("dns1123subdomain"),
        "imagePullSecrets": _array(_obj({"name": _ref("dns1123subdomain")}, ("name",))),
    }, ("containers", "volumes", "terminationGracePeriodSeconds")),
    "resources": _obj({"requests": {"type": "object", "additionalProperties": _ref("quantity")},
                       "limits": {"type": "object", "additionalProperties": _ref("quantity")}}),
    # A TrainJob's runtime patch of the `node` pods: the fields Trainer v2.3 lets a manager set.
    "nodePatch": _obj({
        "containers": _array(_obj({"name": {"const": TRAINJOB_NODE},
                                   "volumeMounts": _array(_obj({"name": _ref("dns1035"),
                                                               "mountPath": {"type": "string", "pattern": "^/"},
                                                               "readOnly": _BOOL}, ("name", "mountPath")))},
                                  ("name", "volumeMounts")), minItems=1, maxItems=1),
        "volumes": _array(_ref("volume"), minItems=1),
        "terminationGracePeriodSeconds": _NONNEG,
        "serviceAccountName": _ref("dns1123subdomain"),
        "nodeSelector": _ref("labels"),
        "tolerations": _array(_ref("toleration")),
        "affinity": _ref("affinity"),
        "imagePullSecrets": _array(_obj({"name": _ref("dns1123subdomain")}, ("name",))),
    }, ("containers", "volumes", "terminationGracePeriodSeconds")),
    "replicaSpec": _obj({
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _obj({"metadata": _obj({"labels": _ref("labels"), "annotations": _ref("annotations")},
                                           ("labels",)),
                          "spec": _ref("podSpec")}, ("metadata", "spec")),
    }, ("replicas", "restartPolicy", "template")),
}

KINDS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "ConfigMap"): _obj({
        "data": {"type": "object", "minProperties": 1, "additionalProperties": _STR},
    }, ("data",)),
    ("kubeflow.org/v1", "PyTorchJob"): _obj({
        "spec": _obj({
            "nprocPerNode": {"type": "string", "pattern": r"^[1-9][0-9]*$"},  # an integer: see the CRD
            "pytorchReplicaSpecs": _obj({t: _ref("replicaSpec") for t in REPLICA_TYPES}, ("Master",)),
            "runPolicy": _obj({
                "backoffLimit": _NONNEG,
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "ttlSecondsAfterFinished": _NONNEG,
                "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                "suspend": _BOOL,
                "schedulingPolicy": _obj({"minAvailable": {"type": "integer", "minimum": 1},
                                          "queue": {"type": "string", "minLength": 1},
                                          "priorityClass": _ref("dns1123subdomain")}, ("minAvailable",)),
            }, ("backoffLimit", "cleanPodPolicy")),
        }, ("nprocPerNode", "pytorchReplicaSpecs", "runPolicy")),
    }, ("spec",)),
    ("v1", "Service"): _obj({
        "spec": _obj({
            "type": {"const": "ClusterIP"},
            "selector": _ref("labels"),
            "ports": _array(_obj({"name": {"type": "string", "pattern": PORT_NAME}, "port": _PORT,
                                  "targetPort": {"type": "string", "pattern": PORT_NAME},
                                  "protocol": {"const": "TCP"}}, ("name", "port", "targetPort", "protocol")),
                            minItems=1),
        }, ("type", "selector", "ports")),
    }, ("spec",)),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): _obj({
        "spec": _obj({
            "runtimeRef": _obj({"apiGroup": {"const": "trainer.kubeflow.org"},
                                "kind": {"const": "ClusterTrainingRuntime"},
                                "name": _ref("dns1123subdomain")}, ("apiGroup", "kind", "name")),
            "suspend": _BOOL,
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "trainer": _obj({
                "image": {"type": "string", "minLength": 1},
                "command": _array(_STR, minItems=1),
                "env": _array(_ref("envVar")),
                "numNodes": {"type": "integer", "minimum": 1},
                "numProcPerNode": {"type": "integer", "minimum": 1},
                "resourcesPerNode": _ref("resources"),
            }, ("image", "command", "env", "numNodes", "numProcPerNode")),
            "runtimePatches": _array(_obj({
                "manager": {"type": "string", "minLength": 1},
                "trainingRuntimeSpec": _obj({"template": _obj({"spec": _obj({"replicatedJobs": _array(_obj({
                    "name": {"const": TRAINJOB_NODE},
                    "template": _obj({"spec": _obj({"template": _obj({
                        "metadata": _obj({"labels": _ref("labels"), "annotations": _ref("annotations")}, ("labels",)),
                        "spec": _ref("nodePatch"),
                    }, ("metadata", "spec"))}, ("template",))}, ("spec",)),
                }, ("name", "template")), minItems=1, maxItems=1)}, ("replicatedJobs",))}, ("spec",))},
                    ("template",)),
            }, ("manager", "trainingRuntimeSpec")), minItems=1, maxItems=1),
        }, ("runtimeRef", "trainer", "runtimePatches")),
    }, ("spec",)),
    ("monitoring.coreos.com/v1", "PodMonitor"): _obj({
        "spec": _obj({
            "jobLabel": _STR,
            "selector": _obj({"matchLabels": _ref("labels")}, ("matchLabels",)),
            "podMetricsEndpoints": _array(_obj({
                "port": {"type": "string", "pattern": PORT_NAME},
                "targetPort": _PORT,
                "path": {"type": "string", "pattern": "^/"},
                "interval": {"type": "string", "pattern": PROM_DURATION.pattern},
                "honorLabels": _BOOL,
            }, ("path", "interval"), minProperties=4, maxProperties=4), minItems=1),  # port or targetPort
        }, ("selector", "podMetricsEndpoints")),
    }, ("spec",)),
}


def _document_schema(api_version: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    properties = {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                  "metadata": _ref("metadata"), **body["properties"]}
    return {**body, "properties": properties, "required": ["apiVersion", "kind", "metadata", *body["required"]]}


SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Kubernetes objects rendered by fljob",
    "$defs": DEFS,
    "oneOf": [_document_schema(api, kind, body) for (api, kind), body in KINDS.items()],
}


# --------------------------------------------------------------------------- interpreter

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}
_patterns: dict[str, re.Pattern[str]] = {}


def _pattern(text: str) -> re.Pattern[str]:
    # `$` would also match before a final newline in Python; a name never ends with one.
    if text not in _patterns:
        _patterns[text] = re.compile(text[:-1] + r"\Z" if text.endswith("$") else text)
    return _patterns[text]


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _errors(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    """Errors of `value` against `schema`, for the keywords SCHEMA uses (and no others)."""
    if "$ref" in schema:
        yield from _errors(value, DEFS[schema["$ref"].rsplit("/", 1)[1]], path)
        return
    if "type" in schema and not _type_ok(value, schema["type"]):
        yield f"{path}: expected {schema['type']}, got {type(value).__name__} {value!r}"
        return
    if "const" in schema and value != schema["const"]:
        yield f"{path}: must be {schema['const']!r}, got {value!r}"
    if "enum" in schema and value not in schema["enum"]:
        yield f"{path}: must be one of {schema['enum']}, got {value!r}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            yield f"{path}: length {len(value)} is outside the allowed range"
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            yield f"{path}: {value!r} does not match {schema['pattern']}"
    if _type_ok(value, "integer") and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        yield f"{path}: {value} is out of range"
    if isinstance(value, dict):
        yield from _object_errors(value, schema, path)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            yield f"{path}: {len(value)} items is outside the allowed range"
        for i, item in enumerate(value):
            yield from _errors(item, schema.get("items", {}), f"{path}[{i}]")


def _object_errors(value: dict[str, Any], schema: dict[str, Any], path: str) -> Iterator[str]:
    for key in schema.get("required", ()):
        if key not in value:
            yield f"{path}: {key} is required"
    if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", len(value)):
        yield f"{path}: {len(value)} fields is outside the allowed range"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if "propertyNames" in schema:
            yield from _errors(key, schema["propertyNames"], f"{path} key")
        if key in properties:
            yield from _errors(item, properties[key], f"{path}.{key}")
        elif extra is False:
            yield f"{path}: unexpected field {key!r}"
        elif isinstance(extra, dict):
            yield from _errors(item, extra, f"{path}.{key}")


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Errors of one rendered object against the schema of its kind."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KINDS:
        return [f"$: fljob does not render {key[0]}/{key[1]}"]
    return list(_errors(obj, _document_schema(*key, KINDS[key]), "$"))


# --------------------------------------------------------------------------- rules


def webhook_errors(job: dict[str, Any]) -> list[str]:
    """The training operator's admission rules that its CRD schema lacks (PyTorchJob), and the
    name rule of both kinds (Services and JobSets are named after the job)."""
    errors = []
    name = job["metadata"]["name"]
    if len(name) > 63 or not DNS1035.match(name):
        errors.append(f"metadata.name {name!r} must be a DNS-1035 label of at most 63 characters")
    if job["kind"] != "PyTorchJob":
        return errors
    specs = job["spec"]["pytorchReplicaSpecs"]
    for rtype, rspec in specs.items():
        if rtype not in REPLICA_TYPES:
            errors.append(f"replica type {rtype!r} is not one of {REPLICA_TYPES}")
        containers = rspec["template"]["spec"]["containers"]
        if not any(c.get("name") == CONTAINER_NAME and c.get("image") for c in containers):
            errors.append(f"{rtype}: needs a container named {CONTAINER_NAME!r} with an image")
    if specs.get("Master", {}).get("replicas") != 1:
        errors.append("Master must have exactly 1 replica")
    if "Worker" in specs and specs["Worker"].get("replicas", 0) < 1:
        errors.append("Worker, when present, needs at least 1 replica")
    return errors


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


JOB_KINDS = ("PyTorchJob", "TrainJob")
# Labels the controllers add to a TrainJob's pods (not in the rendered template): the rank-0 pod's.
TRAINJOB_RANK0_LABELS = {"batch.kubernetes.io/job-completion-index": "0"}


def _pods(job: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """role -> (pod labels as they will be, pod spec) of a job; the pod running rank 0 first."""
    if job["kind"] == "PyTorchJob":
        return {rtype.lower(): (r["template"]["metadata"]["labels"], r["template"]["spec"])
                for rtype, r in job["spec"]["pytorchReplicaSpecs"].items()}
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    return {"master": ({**pod["metadata"]["labels"], **TRAINJOB_RANK0_LABELS}, pod["spec"])}


def reference_errors(objects: list[dict[str, Any]]) -> list[str]:
    """Cross references of each job: its pods mount a rendered ConfigMap and declared volumes,
    its env names are unique; a Service or PodMonitor selects the rank-0 pod of every job it
    belongs to, and only that pod, on a declared port."""
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    errors = []
    masters = []
    for job in (o for o in objects if o["kind"] in JOB_KINDS):
        name = job["metadata"]["name"]
        pods = _pods(job)
        for role, (labels, spec) in pods.items():
            volumes = {v["name"] for v in spec["volumes"]}
            mounted = [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v]
            if len(mounted) != 1 or mounted[0] not in configmaps:
                errors.append(f"{name} {role}: mounts ConfigMaps {mounted}, not one rendered with it")
            for c in spec["containers"]:
                missing = {m["name"] for m in c["volumeMounts"]} - volumes
                if missing:
                    errors.append(f"{name} {role}: mounts undeclared volumes {sorted(missing)}")
        envs = [job["spec"]["trainer"]["env"]] if job["kind"] == "TrainJob" else \
            [c["env"] for _, spec in pods.values() for c in spec["containers"]]
        for env in envs:
            names = [e["name"] for e in env]
            if len(names) != len(set(names)):
                errors.append(f"{name}: duplicate environment variables in {names}")
        master_labels, master_spec = pods["master"]
        ports = {p["name"] for c in master_spec["containers"] for p in c.get("ports", ())}
        others = [labels for role, (labels, _) in pods.items() if role != "master"]
        masters.append((name, master_labels, ports, others))
    for kind, selector_of in (("Service", lambda o: o["spec"]["selector"]),
                              ("PodMonitor", lambda o: o["spec"]["selector"]["matchLabels"])):
        for obj in (o for o in objects if o["kind"] == kind):
            selector = selector_of(obj)
            selected = [m for m in masters if _selects(selector, m[1])]
            if len(selected) != len(masters):
                errors.append(f"the {kind} {obj['metadata']['name']} does not select every job's rank-0 pod")
            if any(_selects(selector, labels) for m in masters for labels in m[3]):
                errors.append(f"the {kind} {obj['metadata']['name']} also selects worker pods")
            wanted = [p["targetPort"] for p in obj["spec"]["ports"]] if kind == "Service" else \
                [e["port"] for e in obj["spec"]["podMetricsEndpoints"] if "port" in e]
            errors += [f"the {kind} uses port {port!r}, which {m[0]}'s rank-0 pod does not declare"
                       for port in wanted for m in selected if port not in m[2]]
    return errors


class RenderBug(AssertionError):
    """fljob rendered an object its own schema rejects: a bug in fljob, not in the spec."""


def validate(objects: list[dict[str, Any]]) -> None:
    """Raise RenderBug listing every schema, webhook and cross-reference error."""
    errors = [f"{o.get('kind')} {o.get('metadata', {}).get('name')}: {e}" for o in objects for e in schema_errors(o)]
    if not errors:
        errors += [f"{o['kind']}: {e}" for o in objects if o["kind"] in JOB_KINDS for e in webhook_errors(o)]
        errors += reference_errors(objects)
    if errors:
        raise RenderBug("fljob rendered invalid Kubernetes objects (a bug in fljob; please report it):\n  "
                        + "\n  ".join(errors))
