"""Checks of rendered Kubernetes objects against the official schemas (tests only).

No API server exists here: the PyTorchJob is checked against the official CRD schema in
../shared/schemas (closed: unknown fields rejected, as kubectl's strict field validation does),
and pod templates, ConfigMaps and Services against the Kubernetes OpenAPI schema through
kubernetes-validate.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "schemas" / "kubeflow"
CRD_FILE = CRD_DIR / "kubeflow.org_pytorchjobs.v1.9.4.yaml"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest Kubernetes the operator 1.9 era runs on


def _closed(schema: Any) -> Any:
    """Reject unknown fields, as `kubectl apply` (strict field validation) and a structural
    schema's pruning would make them fail or vanish; embedded objects stay open."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


def crd_validator(crd_file: Path = CRD_FILE, version: str = "v1") -> jsonschema.Validator:
    """A validator of one served version of an official CRD (skips when ../shared is absent)."""
    if not crd_file.exists():
        pytest.skip(f"official CRD schemas not found: {crd_file.parent} is missing (a fresh clone has no ../shared)")
    return _crd_validator(crd_file, version)


@functools.cache
def _crd_validator(crd_file: Path, version: str) -> jsonschema.Validator:
    if not crd_file.exists():
        pytest.skip(f"official CRD schemas not found: {crd_file.parent} is missing (a fresh clone has no ../shared)")
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_closed(served["schema"]["openAPIV3Schema"]))


def openapi_validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:  # its message embeds the whole schema
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']} ({version}): {str(exc).splitlines()[0]}")


def as_pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": f"{job['metadata']['name']}-{rtype.lower()}", "namespace": "x"},
             "template": rspec["template"]} for rtype, rspec in job["spec"]["pytorchReplicaSpecs"].items()]
