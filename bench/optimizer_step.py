"""Optimizer step time at ~1B parameters: fljob's optimizers against fused AdamW and the bandwidth bound.

Every optimizer keeping two moments must read p, g, m, v and write p, m, v once per step:
7 float32 words per parameter. That many bytes over the measured device copy bandwidth
(bytes read plus written) is the floor no implementation beats. The anchor is
``torch.optim.AdamW(fused=True)``, measured in the same rounds as every other variant.
Parameters have the shapes of the chosen muP flavor (all of them, in one group), float32,
with fixed random gradients; each step is timed with CUDA events after warm-up steps that
create the state (and ADOPT's seeding step).

    python bench/optimizer_step.py                      # GPU, 1.06B flavor
    python bench/optimizer_step.py --smoke              # CPU dry run, tiny flavor

Writes ``bench/results/optimizer_step[-smoke].md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim import Optimizer
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS,
    copy_bandwidth,
    header,
    median,
    pick_device,
    table,
    time_ms,
    write_results,
)
from fljob.trainer.model.flavors import get_flavor
from fljob.trainer.model.model import MuPTransformer
from fljob.trainer.optim import OPTIMIZERS

ANCHOR = "torch AdamW fused"
WORDS_PER_PARAM = 7  # read p, g, m, v; write p, m, v
WEIGHT_DECAY = 0.01  # non-zero, so every path pays for its decay


def parameter_shapes(flavor: str) -> list[torch.Size]:
    with torch.device("meta"):
        model = MuPTransformer(get_flavor(flavor))
    return [p.shape for p in model.parameters()]


def variants(device: torch.device) -> dict[str, Callable[[list[torch.nn.Parameter]], Optimizer]]:
    """Name -> optimizer factory, anchor first."""
    fused_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    out: dict[str, Callable[[list[torch.nn.Parameter]], Optimizer]] = {
        ANCHOR: lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=WEIGHT_DECAY, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(
            ps, lr=1e-3, weight_decay=WEIGHT_DECAY, foreach=True),
    }
    for name in ("adopt", "qhadamw", "qhadopt", "decoupled_adamw"):
        cls = OPTIMIZERS[name]
        out[f"{name} foreach"] = lambda ps, cls=cls: cls(
            ps, lr=1e-3, weight_decay=WEIGHT_DECAY, foreach=True)
        if fused_ok:
            out[f"{name} fused"] = lambda ps, cls=cls: cls(
                ps, lr=1e-3, weight_decay=WEIGHT_DECAY, fused=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="1.06B", help="muP flavor whose shapes to use")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run: tiny flavor, 2 warm-up and 3 timed steps")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.flavor, args.device, args.warmup, args.repeat, args.rounds = "1.25M", "cpu", 2, 3, 2
    device = pick_device(args.device)
    out = args.out or RESULTS / f"optimizer_step{'-smoke' if args.smoke else ''}.md"

    torch.manual_seed(0)
    shapes = parameter_shapes(args.flavor)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    n_params = sum(p.numel() for p in params)
    step_bytes = WORDS_PER_PARAM * 4 * n_params
    bandwidth = copy_bandwidth(device, gib=0.05 if args.smoke else 2.0)
    bound_ms = step_bytes / bandwidth * 1e3

    results: dict[str, list[list[float]]] = {name: [] for name in variants(device)}
    # Rounds visit every variant in turn, so that drift (clocks, temperature) hits all alike.
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, make in variants(device).items():
            opt = make([*params])
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            results[name].append(time_ms(opt.step, device, warmup=args.warmup,
                                         repeat=args.repeat))
            del opt
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    anchor = median([t for r in results[ANCHOR] for t in r])
    rows = []
    for name, rounds in results.items():
        ms = median([t for r in rounds for t in r])
        per_round = [median(r) for r in rounds]
        spread = (max(per_round) - min(per_round)) / ms
        rows.append([name, f"{ms:.3f}", f"{100 * spread:.1f}", f"{ms / anchor:.2f}",
                     f"{ms / bound_ms:.2f}", f"{step_bytes / (ms / 1e3) / 1e9:.0f}"])
    lines = header("Optimizer step time against fused AdamW and the bandwidth bound", device)
    lines += [
        (f"- parameters: {n_params:,} float32 in {len(params)} tensors (shapes of the "
        f"{args.flavor} muP flavor), one group, weight_decay {WEIGHT_DECAY}"),
        f"- bytes per step: {WORDS_PER_PARAM} words x 4 B x parameters = {step_bytes / 1e9:.2f} GB",
        (f"- measured copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s; "
        f"bound = {bound_ms:.3f} ms per step"),
        (f"- timing: {args.rounds} rounds over all variants; per round and variant "
         f"{args.warmup} warm-up steps, then {args.repeat} timed steps "
         f"({'CUDA events' if device.type == 'cuda' else 'host clock'}); reported: the median "
         "of all timed steps, and the spread of the per-round medians"),
        "- targets: each fljob optimizer <= 1.15x fused AdamW and <= 1.5x the bound",
        "",
    ]
    lines += table(["optimizer", "median ms", "round spread %", "x fused AdamW", "x bound",
                    "effective GB/s"], rows)
    write_results(out, lines)


if __name__ == "__main__":
    main()
