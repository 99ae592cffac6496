"""Training throughput and MFU: the muP Llama against torchtitan's stock Llama3 of the same shape.

Both models go through their own torchtitan 0.2.2 parallelize function (per-block
``torch.compile``, compiled loss) on one GPU and run torchtitan's train step: bf16 autocast
(what torchtitan uses on a single device), summed cross-entropy over the token count,
backward, gradient clipping at 1.0 (foreach), optimizer step. Same batch, same sequence
length, random tokens. Variants per flavor:

* ``stock llama3 + AdamW fused`` -- the anchor: ``torchtitan.models.llama3`` with
  ``TransformerModelArgs`` of the flavor's shape (dim, layers, heads, vocab, SwiGLU width);
* ``muP + AdamW fused`` -- the muP model and its muP parameter groups, same optimizer: the
  model's own cost (embedding norm, peri-norms, multipliers);
* ``muP + ADOPT fused`` / ``muP + ADOPT foreach`` -- what fljob trains with.

Throughput is timed over blocks of steps with CUDA events after warm-up (compilation
included there), host synchronised only at block ends, automatic garbage collection off
(as in torchtitan's trainer). MFU uses torchtitan's FLOP count
(``get_dense_model_nparams_and_flops``: 6 x non-embedding parameters + 12 x layers x
heads x head_dim x seq_len per token, causal attention counted in full) over the H100's
989 TFLOP/s dense bf16 peak, the same count for both models.

    python bench/trainer_throughput.py                # GPU: 1.06B and 126M flavors
    python bench/trainer_throughput.py --smoke        # CPU dry run, tiny flavor

Writes ``bench/results/trainer_throughput[-smoke].md``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    H100_BF16_DENSE_PEAK_FLOPS,
    RESULTS,
    header,
    median,
    pick_device,
    table,
    write_results,
)
from fljob.trainer.device import use_device

ANCHOR = "stock llama3 + AdamW fused"
LR = 3e-4


@dataclass
class Variant:
    name: str
    model: str  # "stock" or "mup"
    optimizer: str  # fljob registry name
    implementation: str  # "fused" or "foreach"


VARIANTS = (
    Variant(ANCHOR, "stock", "adamw", "fused"),
    Variant("muP + AdamW fused", "mup", "adamw", "fused"),
    Variant("muP + ADOPT fused", "mup", "adopt", "fused"),
    Variant("muP + ADOPT foreach", "mup", "adopt", "foreach"),
)


@dataclass
class Measured:
    tokens_per_s: float
    step_ms: float
    mfu: float
    flops_per_token: int
    n_params: int
    peak_gib: float


def job_config(seq_len: int, batch: int, compile_model: bool):
    from torchtitan.config import JobConfig

    config = JobConfig()
    config.training.seq_len = seq_len
    config.training.local_batch_size = batch
    config.training.mixed_precision_param = "bfloat16"
    config.activation_checkpoint.mode = "none"
    config.compile.enable = compile_model
    config.compile.components = ["model", "loss"]
    return config


def build_model(variant: Variant, flavor: str, config, device: torch.device) -> nn.Module:
    """The variant's model, parallelised (compiled) on the meta device, then materialised."""
    from torchtitan.distributed import ParallelDims

    from fljob.trainer.model.flavors import get_flavor
    from fljob.trainer.model.model import MuPTransformer
    from fljob.trainer.model.parallelize import parallelize_mup_llama

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    args = get_flavor(flavor, max_seq_len=config.training.seq_len)
    with torch.device("meta"):
        if variant.model == "mup":
            model = parallelize_mup_llama(MuPTransformer(args), dims, config)
        else:
            from torchtitan.models.llama3.infra.parallelize import parallelize_llama
            from torchtitan.models.llama3.model.args import TransformerModelArgs
            from torchtitan.models.llama3.model.model import Transformer

            stock = TransformerModelArgs(
                dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                multiple_of=args.ffn_multiple_of, rope_theta=args.rope_theta,
                max_seq_len=config.training.seq_len)
            model = parallelize_llama(Transformer(stock), dims, config)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    return model.train()


def build_optimizer(variant: Variant, model: nn.Module) -> torch.optim.Optimizer:
    from fljob.trainer.model.mup import mup_param_groups
    from fljob.trainer.optim import build_optimizer as build
    from fljob.trainer.train_spec import WEIGHT_DECAY_MODES

    impl = {"fused": variant.implementation == "fused",
            "foreach": variant.implementation == "foreach"}
    if variant.model == "stock":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, **impl)
    groups = mup_param_groups(model, model.model_args, lr=LR, weight_decay=0.1, eps=1e-8,
                              weight_decay_mode=WEIGHT_DECAY_MODES[variant.optimizer])
    return build(variant.optimizer, groups, lr=LR, **impl)


def train_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                  tokens: torch.Tensor, labels: torch.Tensor, device: torch.device,
                  autocast: torch.dtype | None = torch.bfloat16,
                  ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """torchtitan 0.2.2's single-device train step (Trainer.train_step), without logging.

    The step returns (loss, gradient norm) as device tensors; reading them is the caller's
    choice (and a host synchronisation).
    """
    from torchtitan.distributed.utils import clip_grad_norm_

    params = [p for p in model.parameters()]
    n_tokens = torch.tensor(float(labels.numel()), device=device)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            pred = model(tokens)
            loss = loss_fn(pred, labels) / n_tokens
        del pred
        loss.backward()
        grad_norm = clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        return loss.detach(), grad_norm

    return step


def measure(variant: Variant, flavor: str, seq_len: int, batch: int, device: torch.device,
            compile_model: bool, warmup: int, steps: int, blocks: int) -> Measured:
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.models.utils import get_dense_model_nparams_and_flops

    config = job_config(seq_len, batch, compile_model)
    model = build_model(variant, flavor, config, device)
    optimizer = build_optimizer(variant, model)
    vocab = model.model_args.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(vocab, (batch, seq_len + 1), generator=gen).to(device)
    step = train_step_fn(model, optimizer, build_cross_entropy_loss(config), data[:, :-1],
                         data[:, 1:], device)
    args = model.model_args
    n_params, flops_per_token = get_dense_model_nparams_and_flops(
        args, model, 2 * (args.dim // args.n_heads), seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # As torchtitan's trainer does: no automatic garbage collection inside the loop.
    gc.collect()
    gc.disable()
    for _ in range(warmup):
        step()
    block_ms = []
    for _ in range(blocks):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            block_ms.append(start.elapsed_time(end) / steps)
        else:
            import time

            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            block_ms.append((time.perf_counter() - t0) * 1e3 / steps)
    gc.enable()
    step_ms = median(block_ms)
    tokens_per_s = batch * seq_len / (step_ms / 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return Measured(tokens_per_s, step_ms, flops_per_token * tokens_per_s / H100_BF16_DENSE_PEAK_FLOPS,
                    flops_per_token, n_params, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", default="1.06B:8,126M:16",
                        help="comma-separated FLAVOR:LOCAL_BATCH pairs")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated variant names (the anchor is always run)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks (median reported)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run: tiny flavor, seq 64, 1 warm-up, 1 block of 1 step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.flavors, args.seq_len, args.device = "1.25M:2", 64, "cpu"
        args.warmup, args.steps, args.blocks = 1, 1, 1
    device = pick_device(args.device)
    use_device("cuda" if device.type == "cuda" else "cpu")  # before torchtitan is imported
    torch._dynamo.config.automatic_dynamic_shapes = False  # each model/shape compiles static
    wanted = {n.strip() for n in args.variants.split(",")} | {ANCHOR}
    # The anchor runs first and again last: the two differ by the run-to-run noise.
    variants = [v for v in VARIANTS if v.name in wanted] + [VARIANTS[0]]
    out = args.out or RESULTS / f"trainer_throughput{'-smoke' if args.smoke else ''}.md"

    lines = header("Trainer throughput: muP Llama vs stock torchtitan Llama3", device)
    lines += [
        (f"- seq_len {args.seq_len}, bf16 autocast, compile {'off' if args.no_compile else 'on'} "
        "(per block + loss), no activation checkpointing, 1 device, random tokens"),
        (f"- timing: {args.warmup} warm-up steps, then the median of {args.blocks} blocks of "
        f"{args.steps} steps (events around each block)"),
        (f"- MFU = torchtitan FLOPs/token x tokens/s / {H100_BF16_DENSE_PEAK_FLOPS / 1e12:.0f} "
        "TFLOP/s (H100 dense bf16 peak)"),
        "- targets: muP tokens/s >= 0.98x stock; MFU >= 40% on the ~1B flavor",
        "",
    ]
    for spec in tqdm(args.flavors.split(","), desc="flavors"):
        flavor, batch = spec.split(":")
        results: dict[str, Measured | str] = {}
        for variant in variants:
            if variant.optimizer != "adamw" and variant.implementation == "fused" \
                    and device.type != "cuda":
                results[variant.name] = "skipped: fljob's fused kernels need CUDA"
                continue
            name = variant.name if variant.name not in results else f"{variant.name} (again)"
            try:
                results[name] = measure(variant, flavor, args.seq_len, int(batch), device,
                                                not args.no_compile, args.warmup, args.steps,
                                                args.blocks)
            except torch.OutOfMemoryError as err:
                results[name] = f"OOM ({str(err).splitlines()[0][:80]})"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(name, results[name], flush=True)
        torch._dynamo.reset()
        anchor = results[ANCHOR]
        rows = []
        for name, m in results.items():
            if isinstance(m, str):
                rows.append([name, m, "", "", "", "", "", ""])
                continue
            ratio = f"{m.tokens_per_s / anchor.tokens_per_s:.3f}" if isinstance(anchor, Measured) else ""
            rows.append([name, f"{m.n_params / 1e6:.1f}M", f"{m.tokens_per_s:,.0f}", ratio,
                         f"{m.step_ms:.1f}", f"{100 * m.mfu:.1f}",
                         f"{m.flops_per_token / 1e9:.2f}", f"{m.peak_gib:.1f}"])
        lines += [f"## flavor {flavor}, local batch {batch} x {args.seq_len} tokens", ""]
        lines += table(["variant", "params", "tokens/s", "x stock", "step ms", "MFU %",
                        "GFLOP/token", "peak GiB"], rows)
        lines.append("")
    write_results(out, lines)


if __name__ == "__main__":
    main()
