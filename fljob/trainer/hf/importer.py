"""``fljob import hf``: a Hugging Face Llama folder as a committed fljob checkpoint.

The target model is the spec's (flavor, ``model.width``/``model.depth``, muP settings)
at the folder's vocabulary, with the embedding norm and peri-norms that the folder's
config says it has (none for a stock Llama; ``fljob export hf``'s remote-code exports say).
Every setting that changes the function must agree (shape, heads, RoPE, norm epsilon,
biases, tying); a tensor of another shape is named with both shapes. The weights are
divided by the spec's muP multipliers (:mod:`.folding`), so the fljob model computes what
the HF model computed, and written as ``<CHECKPOINT>/step-0`` with the trainer's commit
protocol (manifest, ``COMMITTED``, ``latest``): model weights only, for a run's
``checkpoint.init_from``. The folder's ``tokenizer.json`` is copied beside the steps, and
the manifest's spec names it as ``data.tokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from fljob.errors import UsageError
from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint.compat import compatibility_record
from fljob.trainer.checkpoint.dcp_storage import storage_writer
from fljob.trainer.checkpoint.manifest import build_manifest
from fljob.trainer.checkpoint.store import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    describe_error,
    step_name,
)
from fljob.trainer.data.mds_prepare import TOKENIZER_FILE
from fljob.trainer.hf import folding
from fljob.trainer.hf.source import check_shapes, single_process_quietly
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import args_for_spec
from fljob.trainer.model.model import MuPTransformer

IMPORT_STEP = 0
MODEL_TYPES = ("llama", "fljob_llama")
REQUIRED_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size")


@dataclass(frozen=True)
class ImportResult:
    uri: str  # the committed step
    args: ModelArgs
    tokenizer: str | None  # where the copied tokenizer.json is


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} ({exc})") from None
    if config.get("model_type") not in MODEL_TYPES:
        raise UsageError(f"{path}: model_type {config.get('model_type')!r} is not a Llama "
                         f"(fljob imports {', '.join(MODEL_TYPES)})")
    missing = [key for key in REQUIRED_CONFIG if not isinstance(config.get(key), int)]
    if missing:
        raise UsageError(f"{path} has no integer {missing[0]}: not a complete Llama config")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``: the index's shards, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise UsageError(f"{folder} has no model.safetensors (or index): fljob imports safetensors "
                     "weights only")


# What transformers' LlamaConfig assumes for a field a config.json leaves out.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
    "mlp_bias": False, "tie_word_embeddings": False, "embedding_multiplier": 1.0,
}


def _config_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every config value that decides the function, from a transformers 4 or 5 config."""
    value = {k: config[k] if config.get(k) is not None else default
             for k, default in _LLAMA_DEFAULTS.items()}
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    value["rope_theta"] = rope.get("rope_theta", value["rope_theta"])  # transformers 5 moved it
    value["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    value.update({key: config[key] for key in REQUIRED_CONFIG})
    heads = config["num_attention_heads"]
    value["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    value["head_dim"] = config.get("head_dim") or config["hidden_size"] // heads
    return value


def target_args(spec: JobSpec, config: Mapping[str, Any]) -> ModelArgs:
    """The spec's model at the folder's vocabulary, with the folder's extra norms; UsageError
    naming the first config value that does not match."""
    args = replace(args_for_spec(spec, vocab_size=int(config["vocab_size"])),
                   max_seq_len=spec.training.seq_len,
                   use_embedding_norm=bool(config.get("embedding_norm", False)),
                   use_peri_norm=bool(config.get("peri_norm", False)))
    wanted = {
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim, "intermediate_size": args.ffn_hidden_dim,
        "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_type": "default", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": args.tie_word_embeddings,
        "embedding_multiplier": folding.embedding_multiplier(args),
    }
    found = _config_values(config)
    for key, value in wanted.items():
        if found[key] != value:
            raise UsageError(f"config.json {key} is {found[key]!r}, the spec's model "
                             f"({spec.model.flavor}, width {args.dim}, depth {args.n_layers}) "
                             f"needs {value!r}")
    return args


def _surplus(name: str, args: ModelArgs) -> bool:
    """A tensor the model has no place for (buffers and a tied lm_head are dropped)."""
    try:
        key = folding.our_key(name)
    except KeyError:
        return True
    return key is not None and not (key == "output.weight" and args.tie_word_embeddings)


def _read_tensors(files: list[Path]) -> tuple[dict[str, list[int]], dict[str, Path]]:
    """Name -> shape and name -> file, from the safetensors headers (no tensor read)."""
    from safetensors import safe_open

    shapes, where = {}, {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is no mapping)
                shapes[name], where[name] = f.get_slice(name).get_shape(), path
    return shapes, where


def _read_weights(files: list[Path], names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the safetensors ``files``, as float32."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({n: f.get_tensor(n).float() for n in f.keys()  # noqa: SIM118
                            if n in names})
    return tensors


def _write_step(folder: Path, store: CheckpointStore, spec: JobSpec, args: ModelArgs,
                state: dict[str, torch.Tensor]) -> str | None:
    """DCP shards, tokenizer, manifest, commit marker and ``latest``, in that order; the
    tokenizer's URI when the folder has one."""
    with single_process_quietly():
        dcp.save(state, storage_writer=storage_writer(store.step_uri(IMPORT_STEP), store),
                 no_dist=True)
    tokenizer = None
    if (folder / TOKENIZER_FILE).is_file():
        store.write_object(TOKENIZER_FILE, (folder / TOKENIZER_FILE).read_bytes())
        tokenizer = f"{store.uri}/{TOKENIZER_FILE}"
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"tokenizer": tokenizer})})
    manifest = {**build_manifest(spec, step=IMPORT_STEP, world_size=1, rank_tokens_seen=0,
                                 compatibility=compatibility_record(spec, args)),
                "imported_from": str(folder.resolve())}
    store.write_object(f"{step_name(IMPORT_STEP)}/{MANIFEST}",
                       json.dumps(manifest, indent=1).encode())
    store.commit(IMPORT_STEP, {"time": manifest["time"], "world_size": 1, "rank_tokens_seen": 0,
                               "imported_from": manifest["imported_from"]})
    return tokenizer


def import_hf(folder: Path, dest: str, spec: JobSpec, store: CheckpointStore) -> ImportResult:
    """Write ``folder`` as step 0 of the empty checkpoint location ``store``."""
    config = read_config(folder)
    args = target_args(spec, config)
    shapes, where = _read_tensors(weight_files(folder))
    with torch.device("meta"):
        model_shapes = {k: v.shape for k, v in MuPTransformer(args).state_dict().items()}
    expected = {folding.hf_key(k): shape for k, shape in model_shapes.items()
                if not (k == "output.weight" and args.tie_word_embeddings)}
    check_shapes(expected, shapes, str(folder))
    unknown = sorted(n for n in shapes if n not in expected and _surplus(n, args))
    if unknown:
        raise UsageError(f"{folder}: tensor {unknown[0]} has no place in the spec's model "
                         f"({len(unknown)} such tensors)")
    try:
        occupied = bool(store.steps())
    except Exception as exc:  # noqa: BLE001  (s3fs, botocore, OSError: one line)
        raise UsageError(f"cannot read {store.uri} ({describe_error(exc, store.secrets)})") from None
    if occupied:
        raise UsageError(f"{dest} already holds checkpoint steps; import into an empty location")
    state = folding.from_hf(_read_weights(sorted(set(where.values())), expected), args)
    try:
        tokenizer = _write_step(folder, store, spec, args, state)
    except Exception as exc:  # noqa: BLE001  (a failed write: nothing is committed)
        raise CheckpointError(f"{store.step_uri(IMPORT_STEP)} was not committed "
                              f"({describe_error(exc, store.secrets)})") from None
    return ImportResult(store.step_uri(IMPORT_STEP), args, tokenizer)
