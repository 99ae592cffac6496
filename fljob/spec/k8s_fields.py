"""The Kubernetes parts of the spec, held to the API server's own rules.

The PyTorchJob CRD schema accepts almost any toleration or affinity; the API server's pod
validation then rejects the pods, and the operator can never start the job. So these models
carry that validation (Kubernetes' `pkg/apis/core/validation`: tolerations, node selector
requirements, label selectors, pod affinity terms, DNS-1123 names), and `fljob validate`
refuses what the cluster would. Field names of `affinity` are camelCase, as in a pod spec,
so that a pod spec's affinity can be pasted in.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Kubernetes label keys: optional DNS-1123 prefix and a name of at most 63 characters.
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024
# The Prometheus operator's Duration type (a PodMonitor's interval).
PROM_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
# The label through which Kueue admits a job from a LocalQueue.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class _K8s(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_subdomain(value: str, what: str) -> str:
    if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        raise ValueError(f"{what} {value!r} must be a DNS-1123 subdomain: lowercase letters, digits, '-' "
                         "and '.', starting and ending with a letter or digit, at most 253 characters")
    return value


def check_label_key(key: str, what: str) -> str:
    prefix, _, name = key.rpartition("/")
    if not LABEL_KEY.match(key) or len(name) > 63 or len(prefix) > 253:
        raise ValueError(f"{what} {key!r} is not a valid Kubernetes key: an optional DNS prefix and '/', then "
                         "a name of at most 63 letters, digits, '-', '_' or '.' (alphanumeric at both ends)")
    return key


def check_label_value(value: str, what: str) -> str:
    if len(value) > 63 or not LABEL_VALUE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid Kubernetes label value (at most 63 characters: "
                         "letters, digits, '-', '_', '.', alphanumeric at both ends)")
    return value


def check_labels(labels: dict[str, str], what: str) -> dict[str, str]:
    for key, value in labels.items():
        check_label_key(key, f"{what} key")
        check_label_value(value, f"{what} value for {key!r}:")
    return labels


def check_annotations(annotations: dict[str, str]) -> dict[str, str]:
    for key in annotations:
        check_label_key(key, "annotation key")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        raise ValueError(f"annotations take {size} bytes; Kubernetes allows {MAX_ANNOTATIONS_BYTES} in all")
    return annotations


# --------------------------------------------------------------------------- tolerations


class Toleration(_K8s):
    """A pod toleration (the API server's rules: operator Exists takes no value and may leave
    the key empty to tolerate every taint; toleration_seconds only with effect NoExecute)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return None if v is None else check_label_key(v, "toleration key")

    @model_validator(mode="after")
    def _rules(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists (it then tolerates every taint)")
        if self.operator == "Exists" and self.value:
            raise ValueError(f"operator Exists takes no value (got {self.value!r}); remove value, or use Equal")
        if self.operator == "Equal" and self.value:
            check_label_value(self.value, "toleration value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds applies only to effect NoExecute (how long the pod may stay "
                             "on a node that gets the taint); set effect: NoExecute or remove it")
        return self


# --------------------------------------------------------------------------- affinity

NodeOperator = Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


def _check_values(operator: str, values: list[str], what: str) -> None:
    if operator in ("In", "NotIn") and not values:
        raise ValueError(f"{what}: operator {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        raise ValueError(f"{what}: operator {operator} takes no values (got {values})")
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?\d+", values[0])):
        raise ValueError(f"{what}: operator {operator} takes exactly one integer value (got {values})")
    for value in values:
        if operator in ("In", "NotIn"):
            check_label_value(value, f"{what} value")


class NodeSelectorRequirement(_K8s):
    key: str
    operator: NodeOperator
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> NodeSelectorRequirement:
        check_label_key(self.key, "matchExpressions key")
        _check_values(self.operator, self.values, f"matchExpressions {self.key!r}")
        return self


class NodeFieldRequirement(_K8s):
    key: Literal["metadata.name"]
    operator: Literal["In", "NotIn"]
    values: list[str] = Field(min_length=1, max_length=1)


class NodeSelectorTerm(_K8s):
    matchExpressions: list[NodeSelectorRequirement] = Field(default_factory=list)
    matchFields: list[NodeFieldRequirement] = Field(default_factory=list)


class NodeSelector(_K8s):
    nodeSelectorTerms: list[NodeSelectorTerm] = Field(min_length=1)


class PreferredSchedulingTerm(_K8s):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_K8s):
    requiredDuringSchedulingIgnoredDuringExecution: NodeSelector | None = None
    preferredDuringSchedulingIgnoredDuringExecution: list[PreferredSchedulingTerm] = Field(default_factory=list)


class LabelSelectorRequirement(_K8s):
    key: str
    operator: SelectorOperator
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> LabelSelectorRequirement:
        check_label_key(self.key, "matchExpressions key")
        _check_values(self.operator, self.values, f"matchExpressions {self.key!r}")
        return self


class LabelSelector(_K8s):
    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    @field_validator("matchLabels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v, "matchLabels")


class PodAffinityTerm(_K8s):
    topologyKey: str
    labelSelector: LabelSelector | None = None
    namespaces: list[str] = Field(default_factory=list)
    namespaceSelector: LabelSelector | None = None

    @field_validator("topologyKey")
    @classmethod
    def _topology(cls, v: str) -> str:
        return check_label_key(v, "topologyKey")

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: list[str]) -> list[str]:
        for namespace in v:
            if len(namespace) > 63 or not DNS1123_LABEL.match(namespace):
                raise ValueError(f"namespace {namespace!r} is not a DNS-1123 label")
        return v


class WeightedPodAffinityTerm(_K8s):
    weight: int = Field(ge=1, le=100)
    podAffinityTerm: PodAffinityTerm


class PodAffinity(_K8s):
    requiredDuringSchedulingIgnoredDuringExecution: list[PodAffinityTerm] = Field(default_factory=list)
    preferredDuringSchedulingIgnoredDuringExecution: list[WeightedPodAffinityTerm] = Field(default_factory=list)


class Affinity(_K8s):
    """A pod spec's affinity, camelCase as there; every part checked as the API server does."""

    nodeAffinity: NodeAffinity | None = None
    podAffinity: PodAffinity | None = None
    podAntiAffinity: PodAffinity | None = None

    def to_pod_spec(self) -> dict[str, object]:
        """As it goes into the pod spec: unset and empty parts left out."""
        return self.model_dump(exclude_none=True, exclude_defaults=True)
