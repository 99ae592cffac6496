"""``fljob export hf``: one committed step of an fljob checkpoint as a Hugging Face folder.

The folder holds ``config.json``, ``generation_config.json``, the weights
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json`` above ``max_shard_size``), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``) and ``fljob_reference.json``
(:mod:`.reference`). A model a stock ``LlamaForCausalLM`` can compute is exported as one;
otherwise ``modeling_fljob_llama.py`` travels with it and ``config.json``'s ``auto_map``
names it (load with ``trust_remote_code=True``). Weights are float32 with the muP
multipliers folded in (:mod:`.folding`). Everything is written at once through
:func:`fljob.files.write_files`; then the folder is loaded back with ``transformers`` and
its logits are checked against the reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fljob.errors import JobFailed, UsageError
from fljob.exitcodes import FAILED
from fljob.files import OutFile, write_files
from fljob.trainer.checkpoint.manifest import git_sha
from fljob.trainer.hf import folding, modeling_fljob_llama
from fljob.trainer.hf.reference import REFERENCE_TEXT, build_reference, deviation, reference_tokens
from fljob.trainer.hf.source import CheckpointSource, load_model_tensors, model_args, stored_tensors
from fljob.trainer.hf.tokenizer import hf_tokenizer
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.model import MuPTransformer

REFERENCE_FILE = "fljob_reference.json"
REMOTE_MODULE = "modeling_fljob_llama"
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class ExportResult:
    paths: list[Path]
    remote_code: bool
    source: str  # the step exported
    tokenizer: str  # where the tokenizer came from
    verified: str | None  # the measured deviation, when checked


def hf_config(args: ModelArgs, eos_id: int) -> Any:
    """The transformers config of ``args``: a ``LlamaConfig``, or the remote-code one with
    fljob's extra settings and the ``auto_map`` that names its classes."""
    from transformers import LlamaConfig

    remote = bool(folding.stock_llama_problems(args))
    shape = {
        "vocab_size": args.vocab_size, "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
        "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": args.tie_word_embeddings, "dtype": "float32",
        # fljob adds no BOS; EOS separates documents; padding is generation's business.
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None}
    if not remote:
        config = LlamaConfig(**shape)
        config.architectures = ["LlamaForCausalLM"]
        return config
    config = modeling_fljob_llama.FljobLlamaConfig(
        **shape, embedding_norm=args.use_embedding_norm, peri_norm=args.use_peri_norm,
        embedding_multiplier=folding.embedding_multiplier(args))
    config.architectures = ["FljobLlamaForCausalLM"]
    config.auto_map = {"AutoConfig": f"{REMOTE_MODULE}.FljobLlamaConfig",
                       "AutoModelForCausalLM": f"{REMOTE_MODULE}.FljobLlamaForCausalLM"}
    return config


def _weight_files(hf_state: dict[str, torch.Tensor], max_shard_size: int | str,
                  progress: bool) -> Iterator[OutFile]:
    """The safetensors files (and the index when sharded); each file is serialised only
    when write_files takes it, so one shard at a time is held as bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save
    from tqdm import tqdm

    split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)

    def files() -> Iterator[OutFile]:
        shards = tqdm(split.filename_to_tensors.items(), desc="writing safetensors",
                      unit="file", disable=not progress)
        for filename, names in shards:
            yield OutFile(filename, save({n: hf_state[n].contiguous() for n in names},
                                         metadata={"format": "pt"}))
        if split.is_sharded:
            index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
            yield OutFile("model.safetensors.index.json", _json(index))

    return files()


def check_shard_size(max_shard_size: int | str) -> None:
    """UsageError for a size huggingface_hub cannot read, before any tensor is loaded."""
    from huggingface_hub import split_torch_state_dict_into_shards

    try:
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)
    except ValueError as exc:
        raise UsageError(f"--max-shard-size {max_shard_size!r}: {exc}") from None


def export_hf(source: CheckpointSource, out: Path, *, tokenizer: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = True,
              progress: bool = False) -> ExportResult:
    """Write ``source`` into the empty or new folder ``out`` (UsageError otherwise)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} is not an empty folder; export into a new one (a stale shard "
                         "of an earlier export would be loaded with the new ones)")
    check_shard_size(max_shard_size)
    stored = stored_tensors(source)
    args = model_args(source, stored)
    tok = hf_tokenizer(source.spec, source.run_folder, tokenizer, vocab_size=args.vocab_size,
                       max_length=args.max_seq_len)
    model = MuPTransformer(args).eval()
    state = model.state_dict()  # the parameters themselves: DCP fills them in place
    load_model_tensors(source, state, progress=progress)
    tokens = reference_tokens(tok.tokenizer.encode(REFERENCE_TEXT), args.max_seq_len)
    reference = {**build_reference(model, tokens), "checkpoint": source.uri, "step": source.step,
                 "fljob_git_sha": git_sha()}
    eos_id = tok.tokenizer.eos_id
    assert eos_id is not None  # TokenizerFile refuses tokenizers without one
    config = hf_config(args, eos_id)
    remote = config.model_type != "llama"
    from transformers import GenerationConfig

    generation = GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id)
    hf_state = folding.to_hf(state, args)
    meta = [OutFile("config.json", config.to_json_string()),
            OutFile("generation_config.json", generation.to_json_string()),
            *(OutFile(name, data) for name, data in tok.files.items()),
            OutFile(REFERENCE_FILE, _json(reference))]
    if remote:
        meta.append(OutFile(f"{REMOTE_MODULE}.py",
                            Path(modeling_fljob_llama.__file__).read_bytes()))
    paths = write_files(out, [*meta, *_weight_files(hf_state, max_shard_size, progress)])
    verified = check_export(out, remote, progress=progress) if verify else None
    return ExportResult(paths, remote, source.uri, tok.source, verified)


def check_export(out: Path, remote_code: bool, *, progress: bool = False) -> str:
    """Load ``out`` with transformers (float32, CPU) and compare it with its reference;
    JobFailed when it is off (the export is then wrong, whatever the folder says)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    if not progress:
        logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=remote_code,
                                                 dtype=torch.float32)
    reference = json.loads((out / REFERENCE_FILE).read_text())
    found = deviation(reference, lambda ids: model(ids).logits)
    summary = f"logits within {found.logits:.1e}, loss within {found.loss:.1e}"
    if not found.within_tolerance:
        raise JobFailed(FAILED, f"{out}: transformers' logits differ from fljob's ({summary}; "
                                f"tolerance {reference['tolerance']}): the export is wrong")
    return summary


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()
