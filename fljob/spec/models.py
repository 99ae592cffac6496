"""The fljob job spec: one YAML document, validated by these models, drives every backend.

Conventions that keep the spec safe to render into shell scripts and manifests:
- unknown keys are errors (``extra="forbid"``), so a typo never silently means "default";
- names that become Kubernetes objects are DNS-1035 labels of at most 63 characters;
- credentials are *references* (an environment variable name, a Kubernetes Secret key or a
  file path); no model has a field that could hold a credential value.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fljob.spec.k8s_fields import (
    KUEUE_QUEUE_LABEL,
    PROM_DURATION,
    Affinity,
    Toleration,
    check_annotations,
    check_label_value,
    check_labels,
    check_subdomain,
)

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
# A value on an #SBATCH line: sbatch reads these lines itself, so keep them to one plain word.
SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:;|&@%+=*!/()\[\]<>-]+$")
K8S_QUANTITY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
SECRET_LIKE_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY)")

# The suffixes the renderers append to `name`; every derived object name must stay within 63.
DERIVED_NAME_SUFFIXES = ("-spec", "-metrics", "-master-0", "-worker-99")

OptimizerName = Literal["adopt", "qhadamw", "qhadopt", "decoupled_adamw", "adamw"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
QUASI_HYPERBOLIC_OPTIMIZERS = ("qhadamw", "qhadopt")  # the ones that take `nus`


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _check_dns1035(value: str, what: str) -> str:
    if len(value) > 63:
        raise ValueError(f"{what} must be at most 63 characters (got {len(value)})")
    if not DNS1035.match(value):
        raise ValueError(
            f"{what} must be a DNS-1035 label: lowercase letters, digits and '-', starting with a "
            f"letter and ending with a letter or digit (got {value!r})"
        )
    return value


# --------------------------------------------------------------------------- secrets


class KubernetesSecretKey(Strict):
    """A key of a Kubernetes Secret in the job's namespace."""

    name: str = Field(description="Secret name (a DNS-1123 subdomain).")
    key: str = Field(description="Key inside the Secret.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_subdomain(v, "Secret name")


class SecretRef(Strict):
    """Where a secret value lives. The value itself never appears in the spec or any render.

    Each backend uses the reference it can: Kubernetes injects ``k8s_secret`` into the variable
    named by ``env``; SLURM and the local backend pass ``env`` through from the submitting
    environment; ``file`` (read on the node at run time) wins over ``env`` when both are set.
    """

    env: str | None = Field(None, description="Environment variable that holds the value at run time.")
    k8s_secret: KubernetesSecretKey | None = Field(None, description="Kubernetes Secret key to inject.")
    file: str | None = Field(None, description="Path, readable on every node, whose content is the value.")

    @field_validator("env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid environment variable name")
        return v

    @model_validator(mode="after")
    def _at_least_one(self) -> SecretRef:
        if self.env is None and self.k8s_secret is None and self.file is None:
            raise ValueError("a secret reference needs at least one of env, k8s_secret or file")
        return self


# --------------------------------------------------------------------------- resources


class Resources(Strict):
    nodes: int = Field(1, ge=1, le=4096, description="Number of nodes (hosts).")
    gpus_per_node: int = Field(0, ge=0, le=64, description="GPUs per node; 0 trains on CPU.")
    procs_per_node: int | None = Field(
        None, ge=1, le=256,
        description="Trainer processes per node; defaults to gpus_per_node, or 1 on CPU.",
    )
    cpus_per_node: int | None = Field(None, ge=1, description="CPU cores to request per node.")
    memory_gib: int | None = Field(
        None, ge=1, description="Memory per node in GiB; unset asks for the site default."
    )

    @property
    def nproc_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    @model_validator(mode="after")
    def _procs_match_gpus(self) -> Resources:
        if self.gpus_per_node and self.procs_per_node and self.procs_per_node != self.gpus_per_node:
            raise ValueError(
                f"procs_per_node ({self.procs_per_node}) must equal gpus_per_node "
                f"({self.gpus_per_node}): fljob runs one trainer process per GPU"
            )
        return self


# --------------------------------------------------------------------------- SLURM


class SlurmContainer(Strict):
    runtime: Literal["none", "pyxis", "apptainer"] = Field(
        "none", description="How the step runs the image: bare, pyxis/enroot, or apptainer exec."
    )
    image: str | None = Field(
        None, description="Image for this runtime (an enroot URI/squashfs or .sif); defaults to `image`."
    )
    mounts: list[str] = Field(default_factory=list, description="Bind mounts 'src:dst[:ro]'.")
    workdir: str | None = Field(None, description="Working directory inside the container.")

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, v: list[str]) -> list[str]:
        for m in v:
            parts = m.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"mount {m!r} must look like 'src:dst' or 'src:dst:ro'")
            if "," in m:
                raise ValueError(f"mount {m!r} must not contain ',' (pyxis separates mounts with it)")
        return v


class Slurm(Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = Field(
        "01:00:00",
        description="Wall-clock limit, always explicit: 'MM', 'HH:MM:SS' or 'D-HH:MM:SS'.",
    )
    constraint: str | None = None
    exclusive: bool = False
    gpu_directive: Literal["gpus-per-node", "gres"] = Field(
        "gpus-per-node", description="'gres' for sites whose SLURM rejects --gpus-per-node."
    )
    container: SlurmContainer = Field(default_factory=SlurmContainer)
    max_restarts: int = Field(
        3, ge=0, le=100, description="Requeue budget: requeue while SLURM_RESTART_COUNT is below this."
    )
    signal: Literal["USR2", "TERM", "USR1"] = Field(
        "USR2", description="Pre-kill signal (USR2: NCCL's proxy thread catches USR1)."
    )
    grace_seconds: int = Field(
        120, ge=10, le=65535, description="Seconds before the time limit when the signal arrives."
    )
    rdzv_port: int = Field(29500, ge=1024, le=65535, description="c10d rendezvous port on the first node.")
    wait_seconds: int = Field(60, ge=0, description="srun --wait: how long the other tasks may outlive the first exit.")
    extra_sbatch: dict[str, str] = Field(
        default_factory=dict, description="More #SBATCH options, e.g. {reservation: big}."
    )

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _directive_word(cls, v: str | None) -> str | None:
        if v is not None and not SLURM_WORD.match(v):
            raise ValueError(
                f"{v!r} must be one word of letters, digits and SLURM's operators (no spaces or quotes)"
            )
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        if v.upper() in ("UNLIMITED", "INFINITE") or not SLURM_TIME.match(v):
            raise ValueError(
                f"time {v!r} must be an explicit limit like '04:00:00' or '1-00:00:00' (never UNLIMITED)"
            )
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = {"job-name", "nodes", "ntasks-per-node", "signal", "requeue", "open-mode", "output", "error"}
        for key, value in v.items():
            if not re.match(r"^[a-z][a-z0-9-]*$", key):
                raise ValueError(f"extra_sbatch key {key!r} must be a long option name like 'reservation'")
            if key in reserved:
                raise ValueError(f"extra_sbatch must not set {key!r}: fljob owns it (set the spec field instead)")
            if not SLURM_WORD.match(value):
                raise ValueError(
                    f"extra_sbatch value {value!r} for {key!r} must be one word (no spaces, quotes or newlines)"
                )
        return v


# --------------------------------------------------------------------------- Kubernetes


class PodMonitorSpec(Strict):
    enabled: bool = True
    labels: dict[str, str] = Field(
        default_factory=lambda: {"release": "kube-prometheus-stack"},
        description="Labels that your Prometheus operator selects PodMonitors by.",
    )
    interval: str = "15s"

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        if not PROM_DURATION.fullmatch(v) or v == "":
            raise ValueError(f"{v!r} is not a Prometheus duration; use e.g. 15s or 1m")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v, "podmonitor label")


KubernetesApi = Literal["pytorchjob", "trainjob"]


class Kubernetes(Strict):
    api: KubernetesApi = Field(
        "pytorchjob", description="pytorchjob: a Kubeflow training-operator v1 PyTorchJob; trainjob: a Kubeflow "
                                  "Trainer v2 TrainJob on a ClusterTrainingRuntime (kubernetes.runtime).")
    runtime: str = Field("torch-distributed",
                         description="trainjob: the ClusterTrainingRuntime to run on (k8s/trainjob-runtime.yaml).")
    namespace: str = "default"
    service_account: str | None = Field(None, description="Service account of the pods (a DNS-1123 subdomain).")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: Affinity | None = Field(
        None, description="A Kubernetes Affinity object, as in a pod spec (camelCase keys: nodeAffinity, "
                          "podAffinity, podAntiAffinity), checked as the API server checks it.")
    priority_class: str | None = Field(None, description="PriorityClass of the pods (a DNS-1123 subdomain).")
    queue: str | None = Field(
        None, description="Kueue LocalQueue: becomes the kueue.x-k8s.io/queue-name label and the job is created "
                          "suspended until Kueue admits it (k8s/README.md); with scheduler_name volcano, the "
                          "Volcano queue of runPolicy.schedulingPolicy instead.")
    scheduler_name: str | None = None
    shm_size: str = Field("16Gi", description="Size of the memory-backed /dev/shm.")
    image_pull_secrets: list[str] = Field(default_factory=list)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    restart_policy: Literal["OnFailure", "ExitCode", "Never", "Always"] = Field(
        "ExitCode",
        description="ExitCode restarts only on retryable codes (the trainer's requeue code, signals).",
    )
    backoff_limit: int = Field(3, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    ttl_seconds_after_finished: int | None = Field(86400, ge=0)
    clean_pod_policy: Literal["All", "Running", "None"] = "All"
    termination_grace_seconds: int = Field(120, ge=0)
    pod_monitor: PodMonitorSpec = Field(default_factory=PodMonitorSpec)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return _check_dns1035(v, "namespace")

    @field_validator("service_account", "priority_class", "scheduler_name", "runtime")
    @classmethod
    def _subdomain(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else check_subdomain(v, info.field_name or "name")

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        if v is None:
            return None
        check_subdomain(v, "queue")
        return check_label_value(v, "queue (it becomes a label value)")

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            check_subdomain(name, "image pull Secret")
        return v

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, v: str) -> str:
        if not K8S_QUANTITY.match(v):
            raise ValueError(f"shm_size {v!r} must be a Kubernetes quantity like '16Gi'")
        return v

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v, "label")

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        return check_annotations(v)

    @model_validator(mode="after")
    def _kueue(self) -> Kubernetes:
        if self.queue and KUEUE_QUEUE_LABEL in self.labels and self.scheduler_name != "volcano":
            raise ValueError(f"set the Kueue queue once: kubernetes.queue ({self.queue!r}) becomes the "
                             f"{KUEUE_QUEUE_LABEL} label; remove it from kubernetes.labels")
        return self


# --------------------------------------------------------------------------- training


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmb])\s*$", re.IGNORECASE)


def _closest_flavor(name: str, flavors: dict[str, int]) -> str | None:
    """'1b' -> the flavor whose parameter count is nearest to a billion."""
    m = _COUNT.match(name)
    if not m:
        return None
    wanted = float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return min(flavors, key=lambda f: abs(flavors[f] - wanted))


class ModelSpec(Strict):
    flavor: str = Field(
        "tiny",
        description="Model flavor, named by its real parameter count: tiny (the CPU-sized one), "
                    "1.25M, 7.61M (the muP base), 35.7M, 126M, 325M, 1.06B.",
    )
    mup: bool = Field(True, description="muP parametrisation; false gives the standard one (the baseline).")
    attention_scale: Literal["mup", "standard"] = Field(
        "mup", description="'mup' scales attention logits by 1/d, 'standard' by 1/sqrt(d)."
    )
    input_alpha: float = Field(1.0, gt=0)
    output_alpha: float = Field(1.0, gt=0)
    depth_alpha_exp: float = Field(1.0, ge=0, le=1, description="CompleteP residual scaling exponent.")
    init_std: float = Field(0.02, gt=0)
    zero_init_readout: bool = Field(
        False, description="Initialise the output (readout) matrix to zero, as Tensor Programs V "
        "suggests for muP: the logits start at 0 at every width. Needs untied embeddings.")
    zero_init_query: bool = Field(
        False, description="Initialise every block's query matrix wq to zero (Tensor Programs V): "
        "attention starts uniform at every width.")
    tie_embeddings: bool = False
    width: int | None = Field(
        None, ge=8, description="Model width (dim), overriding the flavor's; heads follow from its "
        "head_dim, the FFN width from its rule. muP's m stays relative to the base width (256).")
    depth: int | None = Field(
        None, ge=1, le=1024, description="Number of blocks, overriding the flavor's; muP's L stays "
        "relative to the base depth (4).")
    embedding_norm: bool | None = Field(
        None, description="RMSNorm after the token embedding; unset: the flavor's (on). Off, with peri_norm off, "
                          "the model is a stock Llama (fljob export hf writes a LlamaForCausalLM).")
    peri_norm: bool | None = Field(
        None, description="RMSNorm on each residual branch's output too; unset: the flavor's (on).")

    @field_validator("flavor")
    @classmethod
    def _known_flavor(cls, v: str) -> str:
        from fljob.trainer.model.flavors import FLAVORS  # torch-free

        if v == "tiny" or v in FLAVORS:
            return v
        close = _closest_flavor(v, {f: a.num_params() for f, a in FLAVORS.items()})
        hint = f" The nearest in size is {close!r}." if close else ""
        raise ValueError(f"unknown model flavor {v!r}.{hint} Use one of: tiny, {', '.join(FLAVORS)} "
                         "(named by their real parameter count)")

    @model_validator(mode="after")
    def _zero_readout_untied(self) -> ModelSpec:
        if self.zero_init_readout and self.tie_embeddings:
            raise ValueError("model.zero_init_readout: a tied readout is the token embedding, and zeroing "
                             "it would zero the input too; set model.tie_embeddings: false or drop "
                             "zero_init_readout")
        return self

    @model_validator(mode="after")
    def _shape(self) -> ModelSpec:
        from fljob.trainer.model.flavors import FLAVORS, TINY_FLAVOR, with_shape  # torch-free

        if self.width is not None or self.depth is not None:
            flavor = FLAVORS[TINY_FLAVOR if self.flavor == "tiny" else self.flavor]
            try:
                with_shape(flavor, width=self.width, depth=self.depth)
            except ValueError as exc:
                raise ValueError(f"model.width: {exc} (flavor {self.flavor!r})") from None
        return self


class Optimizer(Strict):
    name: OptimizerName = "adamw"
    lr: float = Field(3e-3, gt=0, description="Base learning rate at the base width; muP groups scale it.")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    nus: tuple[float, float] = Field((0.7, 1.0), description="Quasi-hyperbolic nu1, nu2 (qhadamw, qhadopt).")
    implementation: Literal["auto", "foreach", "single_tensor", "fused"] = Field(
        "auto", description="Update path: fused (Triton kernels, CUDA only; the fastest on a GPU), "
        "foreach (multi-tensor ops) or single_tensor; auto is fused on CUDA, foreach on CPU.")
    grad_clip_norm: float | None = Field(1.0, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= x < 1.0 for x in v):
            raise ValueError(f"betas {v} must be two numbers in [0, 1) (a beta of 1 never forgets)")
        return v

    @field_validator("nus")
    @classmethod
    def _nus(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"nus {v} must be two numbers in [0, 1]")
        return v

    @model_validator(mode="after")
    def _optimizer_specific(self) -> Optimizer:
        # Compared with the default, not "was it set": resolved specs (shipped, trials) carry every field.
        if tuple(self.nus) != type(self).model_fields["nus"].default and self.name not in QUASI_HYPERBOLIC_OPTIMIZERS:
            raise ValueError(f"nus is used only by {' and '.join(QUASI_HYPERBOLIC_OPTIMIZERS)}; {self.name} "
                             "would ignore it: remove nus, or choose one of those optimizers")
        if self.name == "qhadopt" and self.nus[1] != 1.0:
            raise ValueError(f"qhadopt needs nus[1] = 1.0 (got {self.nus[1]}): it keeps ADOPT's normaliser, "
                             "so only nu1 mixes; use qhadamw to mix the second moment too")
        return self


class Schedule(Strict):
    warmup_steps: int = Field(0, ge=0)
    decay_type: Literal["linear", "sqrt", "cosine"] = "linear"
    decay_ratio: float | None = Field(
        None, gt=0, le=1, description="Fraction of steps spent decaying (WSD); unset decays after warm-up."
    )
    min_lr_factor: float = Field(0.0, ge=0, le=1)


class Training(Strict):
    steps: int = Field(50, ge=1)
    local_batch_size: int = Field(8, ge=1)
    global_batch_size: int | None = Field(None, ge=1, description="Set for gradient accumulation.")
    seq_len: int = Field(128, ge=8)
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype of the forward/backward.")
    compile: bool = False
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    seed: int = 0
    deterministic: bool = False
    log_interval: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    validation_interval: int | None = Field(
        None, ge=1, description="Steps between held-out evaluations (also after the last step); "
        "unset: none. Evaluates on data.validation, or on the bundled text's held-out split.")
    validation_batches: int = Field(
        8, ge=1, description="Batches per evaluation (of local_batch_size x seq_len per data-parallel "
        "rank): the same held-out batches every time, so evaluations compare.")


class Parallelism(Strict):
    data_parallel_shard_degree: int = Field(-1, description="FSDP degree; -1 uses what is left.")
    data_parallel_replicate_degree: int = Field(1, ge=1)
    tensor_parallel_degree: int = Field(1, ge=1)

    @field_validator("data_parallel_shard_degree")
    @classmethod
    def _shard(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("data_parallel_shard_degree must be -1 (the rest) or a positive number")
        return v


class DataStream(Strict):
    uri: str = Field(description="MDS dataset: an s3:// URI or a local folder.")
    proportion: float | None = Field(None, gt=0, description="Share of samples from this stream.")


class Data(Strict):
    streams: list[DataStream] = Field(
        default_factory=list,
        description="MDS streams; empty trains on the bundled text, prepared into run_dir/data.",
    )
    validation: list[DataStream] = Field(
        default_factory=list,
        description="Held-out MDS streams for training.validation_interval (`fljob data prepare "
                    "--validation-fraction` writes them); empty with the bundled text uses its "
                    "held-out split.",
    )
    tokenizer: str | None = Field(None, description="tokenizer.json path or URI; unset trains a small BPE.")
    shuffle_seed: int = 9176
    predownload: int | None = Field(None, ge=1)
    cache_limit: str | None = Field(None, description="Local cache limit, e.g. '20gb'.")
    local_cache: str | None = Field(None, description="Local cache folder; defaults under run_dir.")
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _proportions(self) -> Data:
        for streams in (self.streams, self.validation):
            given = [s.proportion is not None for s in streams]
            if any(given) and not all(given):
                raise ValueError("give every stream a proportion, or none (then each stream "
                                 "contributes all its samples once per epoch)")
        if self.validation and not self.streams:
            raise ValueError("data.validation needs data.streams: the bundled text brings its own "
                             "held-out split (remove data.validation, or add the training streams)")
        return self


class Checkpoint(Strict):
    uri: str | None = Field(
        None, description="s3://bucket/prefix, file:///path or a path; unset writes run_dir/checkpoints."
    )
    interval_steps: int = Field(500, ge=1)
    keep_latest: int = Field(3, ge=1, description="Committed steps to keep.")
    async_save: bool = False
    resume: bool = Field(True, description="Resume from the latest committed step when one exists.")
    init_from: str | None = Field(
        None, description="A checkpoint (a run's checkpoint folder or URI, or one step-<N> of it) whose model "
                          "weights start this run at step 0, e.g. what `fljob import hf` wrote; only when "
                          "there is nothing of this run to resume (its own latest checkpoint wins).")

    @field_validator("uri", "init_from")
    @classmethod
    def _uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("", "s3", "file"):
            raise ValueError(f"checkpoint {info.field_name} {v!r} must be s3://..., file://... or a path")
        return v


class Pushgateway(Strict):
    url: str = Field(description="Pushgateway base URL, e.g. http://pushgateway:9091")
    interval_seconds: float = Field(15.0, gt=0)


class WandB(Strict):
    """Weights & Biases, beside Prometheus: one W&B run per fljob run, kept across requeues."""

    project: str = Field(description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); unset: the key's default.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline writes the run under <run_dir>/wandb for `wandb sync` later.")
    api_key: SecretRef | None = Field(
        None, description="Where the API key is (a reference, never the value); becomes WANDB_API_KEY. "
                          "Needed online.")
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _key_online(self) -> WandB:
        if self.mode == "online" and self.api_key is None:
            raise ValueError("metrics.wandb.mode online needs api_key: a reference such as {env: WANDB_API_KEY} "
                             "(or use mode: offline)")
        return self


class Metrics(Strict):
    enabled: bool = True
    port: int = Field(9464, ge=1024, le=65535, description="Rank 0 serves /metrics here.")
    optimizer_interval: int = Field(10, ge=1, description="Steps between optimizer statistics.")
    pushgateway: Pushgateway | None = None
    file_sd_dir: str | None = Field(
        None, description="SLURM: shared folder where the job writes its Prometheus file_sd target."
    )
    tensorboard: str | None = Field(
        None, description="TensorBoard log folder or s3:// URI; the run writes <tensorboard>/<run id>, the "
                          "same folder across requeues and resumes.")
    wandb: WandB | None = Field(None, description="Weights & Biases: project, entity, mode, API key reference.")

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and v.split("://", 1)[0] not in ("s3", "file"):
            raise ValueError(f"metrics.tensorboard {v!r} must be a folder, file://... or s3://...")
        return v


class Storage(Strict):
    """Object storage (S3 API) used by data streams and checkpoints."""

    endpoint_url: str | None = Field(None, description="S3 endpoint; unset uses AWS.")
    region: str = "us-east-1"
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None

    @model_validator(mode="after")
    def _pair(self) -> Storage:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key references, or neither")
        return self

    def credential_refs(self) -> dict[str, SecretRef]:
        """The referenced credentials under the variable names boto3 and s3fs read."""
        named = {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
        }
        return {k: v for k, v in named.items() if v is not None}


# --------------------------------------------------------------------------- sweeps


# What a sweep may vary: how the model trains. How it is launched (resources, image, env, the
# cluster sections) is one batch script / one pod template for every trial.
SWEEPABLE_SECTIONS = ("model", "optimizer", "schedule", "training", "data", "checkpoint", "metrics",
                      "parallelism")
# Fields fljob derives per trial.
UNSWEEPABLE_FIELDS = ("checkpoint.uri", "metrics.file_sd_dir")
NAME_FORMAT_FIELDS = ("name", "index")


def grid_field_aliases(keys: list[str]) -> dict[str, str]:
    """name_format placeholders for grid keys: the last path segment ('lr' for 'optimizer.lr')
    where no other key ends the same, and always the whole path with '_' for '.'."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    aliases = {k.replace(".", "_"): k for k in keys}
    aliases.update({tail: k for tail, k in zip(last, keys, strict=True) if last.count(tail) == 1})
    return aliases


class Sweep(Strict):
    """A grid of trials: the spec around it with each combination of the grid's values."""

    grid: dict[str, list[Any]] = Field(
        description="Field path -> the values to try, e.g. {optimizer.lr: [1e-3, 2e-3], model.width: "
                    "[128, 256]}; every combination is one trial (the last key varies fastest).")
    name_format: str = Field(
        "{name}-{index}",
        description="Trial name: {name}, {index} and grid fields by their last path segment ({lr}, "
                    "{width}) or whole path with '_' ({optimizer_lr}); made a DNS-1035 label.")
    parallel: int = Field(1, ge=1, le=10000, description="How many trials run at once.")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("sweep.grid needs at least one field, e.g. {optimizer.lr: [0.001, 0.002]}")
        for key, values in v.items():
            parts = key.split(".")
            if not all(parts) or parts[0] not in SWEEPABLE_SECTIONS or key in UNSWEEPABLE_FIELDS \
                    or any(key.startswith(f"{f}.") for f in UNSWEEPABLE_FIELDS):
                raise ValueError(
                    f"sweep.grid key {key!r} cannot vary between trials: sweep fields under "
                    f"{', '.join(SWEEPABLE_SECTIONS)} (not {', '.join(UNSWEEPABLE_FIELDS)}, which "
                    "fljob sets per trial); how a job is launched is the same for every trial")
            if not values:
                raise ValueError(f"sweep.grid.{key} has no values; give at least one")
            if len({repr(x) for x in values}) != len(values):
                raise ValueError(f"sweep.grid.{key} repeats a value: {values}")
        return v

    @model_validator(mode="after")
    def _name_format(self) -> Sweep:
        import string

        known = {*NAME_FORMAT_FIELDS, *grid_field_aliases(list(self.grid))}
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.name_format) if f is not None]
        except ValueError as exc:
            raise ValueError(f"sweep.name_format {self.name_format!r}: {exc}") from None
        unknown = [f for f in fields if f not in known]
        if unknown or "index" not in fields and not set(fields) & set(grid_field_aliases(list(self.grid))):
            raise ValueError(
                f"sweep.name_format {self.name_format!r} must name each trial apart with "
                f"{{index}} or grid fields, from: {', '.join(sorted(known))}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        return self

    @property
    def size(self) -> int:
        return math.prod(len(values) for values in self.grid.values())


class TrialInfo(Strict):
    """Set by fljob in each trial's resolved spec: which sweep, which trial, what it changed."""

    sweep: str
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- the job


class JobSpec(Strict):
    """A pretraining job: what to train, how, and where it runs."""

    name: str = Field(description="Job name: a DNS-1035 label; Kubernetes objects derive from it.")
    image: str | None = Field(None, description="Container image (required on Kubernetes and containerised SLURM).")
    run_dir: str = Field(
        "runs/{name}",
        description="Where a run writes logs, metrics.jsonl and local files ('{name}' expands); "
        "on SLURM it must be on a filesystem shared by all nodes.",
    )
    resources: Resources = Field(default_factory=Resources)
    slurm: Slurm = Field(default_factory=Slurm)
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    training: Training = Field(default_factory=Training)
    parallelism: Parallelism = Field(default_factory=Parallelism)
    data: Data = Field(default_factory=Data)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    metrics: Metrics = Field(default_factory=Metrics)
    storage: Storage = Field(default_factory=Storage)
    env: dict[str, str] = Field(default_factory=dict, description="Plain environment variables for every process.")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict, description="Environment variables whose values come from secret references."
    )
    sweep: Sweep | None = Field(
        None, description="Run a grid of trials instead of one job (fljob submit runs them all; "
                          "fljob sweep report compares them).")
    trial: TrialInfo | None = Field(None, description="Set by fljob in the spec of a sweep's trial.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_dns1035(v, "name")
        longest = max(DERIVED_NAME_SUFFIXES, key=len)
        if len(v) + len(longest) > 63:
            raise ValueError(
                f"name must be at most {63 - len(longest)} characters so that derived objects such as "
                f"'{v}{longest}' stay within Kubernetes' 63-character limit (got {len(v)})"
            )
        return v

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict[str, object]) -> dict[str, object]:
        for key in v:
            if not ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if SECRET_LIKE_ENV.search(key.upper()):
                raise ValueError(
                    f"{key!r} looks like a secret: move it to secret_env with a reference "
                    f"(e.g. secret_env: {{{key}: {{env: {key}}}}}) so its value is never written anywhere"
                )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        wandb_key = {"WANDB_API_KEY"} if self.metrics.wandb and self.metrics.wandb.api_key else set()
        overlap = (set(self.env) | set(self.secret_env)) & (set(self.storage.credential_refs()) | wandb_key) \
            | set(self.env) & set(self.secret_env)
        if overlap:
            raise ValueError(f"{', '.join(sorted(overlap))} is set twice (env, secret_env, storage or "
                             "metrics.wandb.api_key); keep one")
        if self.sweep is not None and self.trial is not None:
            raise ValueError("a spec is a sweep or one of its trials, not both: remove trial")
        if self.training.validation_interval and self.data.streams and not self.data.validation:
            raise ValueError(
                "training.validation_interval needs held-out data: add data.validation streams "
                "(`fljob data prepare --validation-fraction` writes them), or unset the interval")
        tp = self.parallelism.tensor_parallel_degree
        world = self.resources.nodes * self.resources.nproc_per_node
        if world % tp:
            raise ValueError(
                f"parallelism.tensor_parallel_degree ({tp}) must divide the world size "
                f"(nodes x procs per node = {world})"
            )
        if self.training.seq_len % tp:
            raise ValueError(f"training.seq_len ({self.training.seq_len}) must be a multiple of "
                             f"parallelism.tensor_parallel_degree ({tp}): sequence parallelism splits it")
        if self.optimizer.implementation == "fused" and self.training.device == "cpu":
            raise ValueError("optimizer.implementation fused runs Triton kernels on CUDA only; training.device is "
                             "cpu: use auto or foreach")
        return self

    # Where each field came from ("spec.yaml:12:3" or "--set ..."), filled in by the loader so
    # that checks made after validation (by a backend) can point at the line too.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    # A sweep's trials, once expanded (fljob.spec.sweep.expand): specs are not changed after loading.
    _trials: list[Any] | None = PrivateAttr(default=None)

    def origin(self, field: str = "") -> str:
        """The position of `field` (dotted), or of its nearest ancestor that has one."""
        parts = field.split(".") if field else []
        for n in range(len(parts), -1, -1):
            found = self._origins.get(".".join(parts[:n]))
            if found:
                return found
        return "spec"

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir.replace("{name}", self.name)

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.nproc_per_node

