"""Hugging Face out and in: `fljob export hf` folders load in transformers and compute fljob's
logits, `fljob import hf` gives them back, and bad input is one line with exit 2.

Checkpoints are saved through fljob's own checkpointer (FljobCheckpointManager, a gloo world
of one) for every setting that changes the function: muP on/off, tied/untied, muP/standard
attention scale, embedding norm and peri-norms on/off, with input/output/depth multipliers
that are not powers of two (so folding rounds). One slow test runs the whole path from a real
2-rank `fljob train` run. The transformers model is loaded in float32 on the CPU and must
match fljob_reference.json within its tolerance (reference.ATOL + RTOL x |logit|).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from stateful import Counter

pytest.importorskip("torchtitan", reason="torchtitan (the trainer extra) is not installed")
pytest.importorskip("transformers", reason="transformers (the trainer extra) is not installed")

import torch
import yaml
from ports import free_port
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import Checkpoint as CheckpointConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from fljob.cli import main as fljob
from fljob.errors import UsageError
from fljob.spec.loader import dump_spec
from fljob.spec.models import JobSpec, Storage
from fljob.trainer.checkpoint import FljobCheckpointManager, open_store
from fljob.trainer.checkpoint.compat import compatibility_record
from fljob.trainer.data.tokenizer import TokenizerFile, train_bpe
from fljob.trainer.hf import reference as ref
from fljob.trainer.hf.init_from import init_model_from
from fljob.trainer.hf.source import load_model_tensors, model_args, open_checkpoint, stored_tensors
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import args_for_spec
from fljob.trainer.model.model import MuPTransformer

VOCAB = 512
SEQ_LEN = 32
# Multipliers that are not powers of two, so every fold changes the rounding; depth 2
# against the base depth 4 gives a residual multiplier of 0.5 ** -0.5.
MUP_SETTINGS = {"flavor": "tiny", "depth": 2, "input_alpha": 2.0, "output_alpha": 1.5,
                "depth_alpha_exp": 0.5}


pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fljob.trainer.data.text import bundled_documents

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(bundled_documents()[:20], VOCAB).save(str(path))
    return path


def make_spec(tmp_path: Path, tokenizer: Path, **model: object) -> JobSpec:
    return JobSpec.model_validate({
        "name": "hf", "run_dir": str(tmp_path / "run"), "model": {**MUP_SETTINGS, **model},
        "training": {"seq_len": SEQ_LEN}, "data": {"tokenizer": str(tokenizer)},
        "checkpoint": {"uri": str(tmp_path / "ckpt")}})


def trained_like(args: ModelArgs, seed: int = 0) -> MuPTransformer:
    """A model whose weights, norm gains included, are not at their init values."""
    torch.manual_seed(seed)
    model = MuPTransformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.5 * p.std()))
    return model.eval()


def save_with_checkpointer(spec: JobSpec, model: MuPTransformer, step: int = 1) -> str:
    """Commit ``model`` (with an optimizer state) as ``step`` through fljob's checkpointer."""
    uri = str(spec.checkpoint.uri)
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-3})
    manager = FljobCheckpointManager(
        store=open_store(uri, spec), spec=spec, keep_latest=3, resume=True,
        checkpoint_config=CheckpointConfig(enable=True, folder=uri, interval=1),
        compatibility=compatibility_record(spec, model.model_args), dataloader=Counter(),
        model_parts=[model], optimizers=optimizers,
        lr_schedulers=LRSchedulersContainer(optimizers, lambda s: 1.0),
        states={"train_state": Counter()})
    try:
        manager.save(step, last_step=True)
    finally:
        manager.close()
    return uri


def model_with_norms(spec: JobSpec, embedding_norm: bool, peri_norm: bool) -> MuPTransformer:
    args = dataclasses.replace(args_for_spec(spec, VOCAB), max_seq_len=SEQ_LEN,
                               use_embedding_norm=embedding_norm, use_peri_norm=peri_norm)
    return trained_like(args)


def load_hf(out: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True,
                                                dtype=torch.float32).eval()


def assert_matches_reference(out: Path, hf_model: Any) -> ref.Deviation:
    reference = json.loads((out / "fljob_reference.json").read_text())
    found = ref.deviation(reference, lambda ids: hf_model(ids).logits)
    assert found.within_tolerance, found
    return found


def export(checkpoint: str | Path, out: Path, *extra: str) -> None:
    assert fljob(["export", "hf", str(checkpoint), "-o", str(out), "--no-progress", *extra]) == 0


# (model spec fields, embedding norm, peri-norms, stock Llama?)
SETTINGS = {
    "mup-flavor-norms": ({}, True, True, False),
    "sp-standard-attention": ({"mup": False, "attention_scale": "standard"}, False, False, True),
    "mup-standard-attention": ({"attention_scale": "standard"}, False, False, True),
    "mup-mup-attention": ({}, False, False, True),
    "mup-tied": ({"tie_embeddings": True, "input_alpha": 1.0}, False, False, True),
    "mup-tied-input-alpha": ({"tie_embeddings": True}, False, False, False),
    "mup-tied-embedding-norm": ({"tie_embeddings": True}, True, False, False),
    "mup-peri-norm-only": ({}, False, True, False),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_export_computes_fljobs_logits_in_transformers(tmp_path: Path, tokenizer_path: Path,
                                                       name: str) -> None:
    fields, embedding_norm, peri_norm, stock = SETTINGS[name]
    spec = make_spec(tmp_path, tokenizer_path, **fields)
    model = model_with_norms(spec, embedding_norm, peri_norm)
    out = tmp_path / "hf"
    export(save_with_checkpointer(spec, model), out, "--no-verify")

    reference = json.loads((out / "fljob_reference.json").read_text())
    with torch.no_grad():  # the reference is fljob's own model's output
        ours = model(torch.tensor([reference["tokens"]]))[0]
    for entry in reference["logits"]:
        torch.testing.assert_close(ours[entry["position"], entry["token_ids"]],
                                   torch.tensor(entry["values"]), rtol=0, atol=1e-6)
    assert len(reference["tokens"]) == SEQ_LEN and len(reference["logits"][0]["token_ids"]) >= 24

    config = json.loads((out / "config.json").read_text())
    hf_model = load_hf(out)
    assert type(hf_model).__name__ == ("LlamaForCausalLM" if stock else "FljobLlamaForCausalLM")
    assert ("auto_map" in config) != stock and (out / "modeling_fljob_llama.py").exists() != stock
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == model.model_args.tie_word_embeddings
    found = assert_matches_reference(out, hf_model)
    print(f"{name}: max |logit diff| {found.logits:.2e}, |loss diff| {found.loss:.2e}")


def test_sharded_export_is_verified_and_its_tokenizer_is_the_runs(tmp_path: Path,
                                                                    tokenizer_path: Path) -> None:
    spec = make_spec(tmp_path, tokenizer_path)
    out = tmp_path / "hf"
    export(save_with_checkpointer(spec, model_with_norms(spec, True, True)), out,
           "--max-shard-size", "100KB")  # verified by the command itself
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    text = "Return a new sorted list from the items in iterable.\n\n  ü 日本"
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert hf_tokenizer(text)["input_ids"] == TokenizerFile(tokenizer_path).encode(text)
    assert hf_tokenizer.eos_token_id == TokenizerFile(tokenizer_path).eos_id
    assert_matches_reference(out, load_hf(out))


def read_back(location: str) -> MuPTransformer:
    """The fljob model an fljob checkpoint holds, loaded the way export loads it."""
    source = open_checkpoint(location, step=None, storage=Storage())
    model = MuPTransformer(model_args(source, stored_tensors(source))).eval()
    load_model_tensors(source, model.state_dict())
    return model


@pytest.mark.parametrize(("name", "import_fields"), [
    ("mup-mup-attention", {}),  # stock Llama
    ("mup-flavor-norms", {}),  # remote code
    # Imported into other muP settings the weights change, the function does not.
    ("mup-tied", {"mup": False, "attention_scale": "standard", "input_alpha": 1.0}),
])
def test_export_then_import_gives_the_same_logits(tmp_path: Path, tokenizer_path: Path,
                                                  name: str, import_fields: dict) -> None:
    fields, embedding_norm, peri_norm, _ = SETTINGS[name]
    spec = make_spec(tmp_path, tokenizer_path, **fields)
    model = model_with_norms(spec, embedding_norm, peri_norm)
    out = tmp_path / "hf"
    export(save_with_checkpointer(spec, model), out, "--no-verify")
    spec_file = tmp_path / "import.yaml"
    spec_file.write_text(dump_spec(make_spec(tmp_path, tokenizer_path, **{**fields, **import_fields})))
    imported = tmp_path / "imported"
    assert fljob(["import", "hf", str(out), str(spec_file), "-o", str(imported)]) == 0
    assert (imported / "latest").read_text().strip() == "step-0"
    assert (imported / "step-0" / "COMMITTED").is_file()
    assert (imported / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()

    back = read_back(str(imported))
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    if not import_fields:  # the same settings: the same weights
        for key, value in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], value, rtol=1e-6, atol=0)
    # ... and exported again, the imported checkpoint finds its tokenizer by itself.
    export(imported, tmp_path / "again")


def test_import_names_what_does_not_match(tmp_path: Path, tokenizer_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    spec = make_spec(tmp_path, tokenizer_path)
    out = tmp_path / "hf"
    export(save_with_checkpointer(spec, model_with_norms(spec, False, False)), out, "--no-verify")

    def import_with(spec: JobSpec, dest: str) -> str:
        spec_file = tmp_path / f"{dest}.yaml"
        spec_file.write_text(dump_spec(spec))
        assert fljob(["import", "hf", str(out), str(spec_file), "-o", str(tmp_path / dest)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and not (tmp_path / dest).exists()
        return lines[0]

    wide = make_spec(tmp_path, tokenizer_path, width=128)
    assert "config.json hidden_size is 64" in import_with(wide, "wide")
    assert "num_hidden_layers is 2" in import_with(make_spec(tmp_path, tokenizer_path, depth=3), "deep")
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    line = import_with(spec, "shape")
    assert "tensor model.layers.1.mlp.up_proj.weight has shape [100, 64], the model needs [192, 64]" in line


def test_bad_export_input_is_one_line_and_exit_2(tmp_path: Path, tokenizer_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spec(tmp_path, tokenizer_path)
    uri = save_with_checkpointer(spec, model_with_norms(spec, False, False), step=3)
    (tmp_path / "not-empty").mkdir()
    (tmp_path / "not-empty" / "x").write_text("x")
    (tmp_path / "ckpt" / "step-5").mkdir()  # a save that never committed
    cases = {
        str(tmp_path / "missing"): "no such file or folder",
        str(tmp_path / "not-empty"): "not an fljob checkpoint",
        f"{uri}/step-5": "step-5 is not a committed checkpoint (committed steps in",
    }
    for location, message in cases.items():
        assert fljob(["export", "hf", location, "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert fljob(["export", "hf", uri, "-o", str(tmp_path / "not-empty")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert fljob(["export", "hf", uri, "--tokenizer", str(tmp_path / "missing.json"),
                  "-o", str(tmp_path / "out")]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_init_from_loads_the_weights_into_a_new_runs_model(tmp_path: Path,
                                                            tokenizer_path: Path) -> None:
    from torchtitan.components.checkpoint import ModelWrapper

    spec = make_spec(tmp_path / "source", tokenizer_path)
    source_model = model_with_norms(spec, True, True)
    uri = save_with_checkpointer(spec, source_model, step=4)
    run = make_spec(tmp_path / "new", tokenizer_path).model_copy(deep=True)
    run.checkpoint.init_from = uri
    fresh = trained_like(source_model.model_args, seed=1)
    wrapper = ModelWrapper(fresh)
    assert init_model_from(run, wrapper) == f"{uri}/step-4"
    for key, value in source_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    run.checkpoint.init_from = None
    assert init_model_from(run, wrapper) is None

    wider = make_spec(tmp_path / "wide", tokenizer_path, width=128).model_copy(deep=True)
    wider.checkpoint.init_from = uri
    args = dataclasses.replace(args_for_spec(wider, VOCAB), use_embedding_norm=True,
                               use_peri_norm=True)
    with pytest.raises(UsageError, match=r"tok_embeddings.weight has shape \[512, 64\], the "
                                         r"model needs \[512, 128\]"):
        init_model_from(wider, ModelWrapper(MuPTransformer(args)))


@pytest.mark.slow
def test_a_two_rank_fljob_train_run_exports_generates_and_imports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole path: a real run (FSDP over 2 ranks, the tiny flavor with its norms), the
    CLI export with its own check, transformers generating, and the import back."""
    repo = Path(__file__).resolve().parents[2]
    spec = {"name": "hf-e2e", "run_dir": str(tmp_path / "run"),
            "model": {"flavor": "tiny", "output_alpha": 1.5},
            "optimizer": {"name": "adamw", "lr": 3e-3}, "schedule": {"warmup_steps": 1},
            "training": {"steps": 3, "local_batch_size": 2, "seq_len": SEQ_LEN, "device": "cpu"},
            "checkpoint": {"interval_steps": 2}, "metrics": {"port": free_port()}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(repo),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    done = subprocess.run(
        [sys.executable, "-m", "fljob.cli", "launch", "--standalone", "--nnodes=1",
         "--nproc-per-node=2", "--", "train", str(spec_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step-3" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    out = tmp_path / "hf"
    export(tmp_path / "run", out)  # the run folder; verified by the command itself
    assert (f"run/checkpoints/step-3 as fljob_llama (trust_remote_code=True), tokenizer from "
            f"{tmp_path / 'run' / 'data' / 'tokenizer.json'}; transformers matches fljob: "
            "logits within") in capsys.readouterr().out
    hf_model = load_hf(out)
    assert_matches_reference(out, hf_model)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("Return a new sorted list", return_tensors="pt").input_ids
    generated = hf_model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5) and torch.equal(generated[0, :ids.shape[1]], ids[0])
    with torch.no_grad():  # greedy: each new token is the argmax of fljob's own model
        fljob_model = read_back(str(tmp_path / "run" / "checkpoints"))
        assert torch.equal(fljob_model(generated[:, :-1])[0, ids.shape[1] - 1:].argmax(-1),
                           generated[0, ids.shape[1]:])
    assert fljob(["import", "hf", str(out), str(spec_file), "-o", str(tmp_path / "imported")]) == 0
    back = read_back(str(tmp_path / "imported"))
    tokens = torch.randint(0, back.model_args.vocab_size, (1, SEQ_LEN))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), fljob_model(tokens), rtol=1e-5, atol=1e-5)
    # A new run starts from the imported weights (checkpoint.init_from): its first loss is the
    # trained model's, not a fresh initialisation's.
    again = {**spec, "name": "hf-init", "run_dir": str(tmp_path / "run2"),
             "checkpoint": {"init_from": str(tmp_path / "imported")}, "training": {**spec["training"], "steps": 1}}
    again_file = tmp_path / "again.yaml"
    again_file.write_text(yaml.safe_dump(again))
    started = subprocess.run([sys.executable, "-m", "fljob.cli", "train", str(again_file)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
    assert f"Initialised the model from {tmp_path / 'imported'}" in started.stderr

    def first_loss(run: str) -> float:
        records = [json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in records if "loss" in r)

    assert first_loss("run2") < first_loss("run") - 0.1
