"""An fljob checkpoint to read model weights from: where it is, which step, which model.

``CHECKPOINT`` of ``fljob export hf`` and ``checkpoint.init_from`` may be

- a run folder (local; it holds the ``spec.yaml`` a backend wrote or the trainer's
  ``job_config.json``): its spec says where the checkpoints are (``checkpoint.uri``, else
  ``<run folder>/checkpoints``);
- a checkpoint URI or folder (``s3://bucket/prefix``, ``file://...``, a path): the step
  that ``latest`` names (checked against its commit marker, as resume does);
- one step of it, ``.../step-<N>``.

Only committed steps are read. The model is the one the step's ``manifest.json`` describes
(its resolved spec: flavor, width, depth, muP settings) at the vocabulary of the stored
embedding; whether it has an embedding norm and peri-norms (``ModelArgs`` fields that the
spec does not expose) is read from the stored tensors. Only the model's tensors are read,
never the optimizer state, whatever number of ranks wrote them (DCP reshards on load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, StorageReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from tqdm import tqdm

from fljob.errors import UsageError
from fljob.spec.models import JobSpec, Storage
from fljob.trainer.checkpoint.store import (
    DCP_METADATA,
    LATEST,
    MANIFEST,
    CheckpointStore,
    describe_error,
    normalize_uri,
    step_name,
    storage_options,
)
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import args_for_spec

RUN_FOLDER_FILES = ("spec.yaml", "job_config.json")
"""What makes a folder a run folder: the spec a backend wrote beside the job, or the
JobConfig (with the spec inside) that the trainer writes at start."""
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointSource:
    """One committed step of an fljob checkpoint, its manifest's spec, and the run folder
    it was named through (if it was)."""

    store: CheckpointStore
    step: int
    spec: JobSpec
    run_folder: Path | None = None

    @property
    def uri(self) -> str:
        return self.store.step_uri(self.step)


def open_checkpoint(location: str, *, step: int | None, storage: Storage, base_dir: str = ".",
                    environ: Mapping[str, str] = os.environ) -> CheckpointSource:
    """Resolve ``location`` (run folder, checkpoint URI or step folder; a relative path is
    taken from ``base_dir``) to a committed step.

    ``storage`` gives the S3 endpoint and credential references for ``s3://`` locations (a
    run folder's own spec takes over for its checkpoints). UsageError, one line, when there
    is no fljob checkpoint there or the step is not committed.
    """
    uri, run_folder = location, None
    if "://" not in location:
        path = Path(base_dir, location)
        if not path.exists():
            raise UsageError(f"{location}: no such file or folder")
        if any((path / name).is_file() for name in RUN_FOLDER_FILES):
            run_folder = path.resolve()
            spec = _run_folder_spec(run_folder)
            storage = spec.storage
            uri = normalize_uri(spec.checkpoint.uri or "checkpoints", str(run_folder))
    uri = normalize_uri(uri, base_dir)
    named = _STEP_FOLDER.match(uri.rstrip("/").rsplit("/", 1)[-1])
    if named and run_folder is None:
        if step is not None and step != int(named.group(1)):
            raise UsageError(f"{location} is step {named.group(1)}, but --step {step} was given")
        uri, step = uri.rstrip("/").rsplit("/", 1)[0], int(named.group(1))
    store = CheckpointStore(uri, storage_options(uri, storage, environ))
    try:
        chosen = _committed_step(store, step, location)
        manifest = store.read_object(f"{step_name(chosen)}/{MANIFEST}")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001  (s3fs, botocore, OSError: one line)
        raise UsageError(f"cannot read {uri} ({describe_error(exc, store.secrets)})") from None
    if manifest is None:
        raise UsageError(f"{store.step_uri(chosen)} has no {MANIFEST}: not an fljob checkpoint")
    return CheckpointSource(store, chosen, _manifest_spec(manifest, store.step_uri(chosen)),
                            run_folder)


def _run_folder_spec(folder: Path) -> JobSpec:
    from fljob.spec.loader import load_spec

    if (folder / "spec.yaml").is_file():
        return load_spec(folder / "spec.yaml")
    try:
        return JobSpec.model_validate(json.loads((folder / "job_config.json").read_text())
                                      ["fljob"]["spec"])
    except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is one
        raise UsageError(f"{folder}/job_config.json holds no fljob job spec this fljob reads; "
                         "name the checkpoint folder instead") from None


def _committed_step(store: CheckpointStore, step: int | None, location: str) -> int:
    if step is not None:
        if store.is_committed(step):
            return step
        committed = ", ".join(map(step_name, store.committed_steps())) or "none"
        raise UsageError(f"{store.step_uri(step)} is not a committed checkpoint "
                         f"(committed steps in {store.uri}: {committed})")
    if not store.steps() and store.read_object(LATEST) is None:
        raise UsageError(f"{location} is not an fljob checkpoint: no step-<N> folders and "
                         f"no `{LATEST}` in {store.uri}")
    latest = store.latest_step()
    if latest is None:
        raise UsageError(f"{store.uri} holds no committed step (a save that never finished?); "
                         "name a committed one with --step")
    return latest


def _manifest_spec(raw: bytes, where: str) -> JobSpec:
    from fljob.spec.loader import load_spec_text

    try:
        return load_spec_text(json.loads(raw)["spec"], source=f"{where}/{MANIFEST}")
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{where}/{MANIFEST} holds no job spec: not an fljob checkpoint") from None


# ------------------------------------------------------------------ the model's tensors


def model_reader(source: CheckpointSource) -> StorageReader:
    """DCP's reader for the step, reading only the byte ranges of what is loaded (so the
    optimizer state is never transferred, unlike the trainer's whole-object reader)."""
    if source.store.local:
        return FileSystemReader(source.uri)
    return FsspecReader(source.uri, **source.store.options)


def stored_tensors(source: CheckpointSource) -> dict[str, TensorStorageMetadata]:
    """Name -> stored shape and dtype of every tensor of the step."""
    try:
        metadata = model_reader(source).read_metadata()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {source.uri}/{DCP_METADATA} "
                         f"({describe_error(exc, source.store.secrets)})") from None
    return {k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def model_args(source: CheckpointSource, stored: Mapping[str, TensorStorageMetadata]) -> ModelArgs:
    """The model the step holds: its spec's, at the stored vocabulary, with the norms the
    stored tensors have, sized for the run's sequence length."""
    embedding = stored.get("tok_embeddings.weight")
    if embedding is None:
        raise UsageError(f"{source.uri} holds no tok_embeddings.weight: not an fljob model checkpoint")
    args = args_for_spec(source.spec, vocab_size=embedding.size[0])
    return dataclasses.replace(
        args, max_seq_len=source.spec.training.seq_len,
        use_embedding_norm="embedding_norm.weight" in stored,
        use_peri_norm="layers.0.post_attn_norm.weight" in stored)


def check_shapes(expected: Mapping[str, torch.Size | tuple[int, ...]],
                 found: Mapping[str, torch.Size | tuple[int, ...]], where: str) -> None:
    """UsageError naming the first tensor that is missing or has another shape."""
    for name, shape in expected.items():
        if name not in found:
            raise UsageError(f"{where} has no tensor {name} (expected shape {list(shape)})")
        if tuple(found[name]) != tuple(shape):
            raise UsageError(f"{where}: tensor {name} has shape {list(found[name])}, "
                             f"the model needs {list(shape)}")


@contextmanager
def single_process_quietly() -> Iterator[None]:
    """Silence DCP's warning that it assumes one process: these callers mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _ProgressPlanner(DefaultLoadPlanner):
    """DCP's load planner, counting the bytes of every tensor it receives."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        self.bar.update(tensor.numel() * tensor.element_size())


def load_model_tensors(source: CheckpointSource, state: dict[str, Any], *,
                       distributed: bool = False, progress: bool = False) -> None:
    """Fill ``state`` (name -> tensor or DTensor, the model's keys only) from the step, in
    place; ``distributed``: every process of the run calls it together, each loading its
    shards."""
    stored = stored_tensors(source)
    check_shapes({k: v.shape for k, v in state.items()}, {k: v.size for k, v in stored.items()},
                 source.uri)
    total = sum(v.numel() * v.element_size() for v in state.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {step_name(source.step)}",
              disable=not progress) as bar, single_process_quietly():
        try:
            dcp.load(state, storage_reader=model_reader(source), planner=_ProgressPlanner(bar),
                     no_dist=not distributed)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise UsageError(f"loading the model from {source.uri} failed "
                             f"({describe_error(exc, source.store.secrets)})") from None
