"""`fljob mup coord-check`: does the activation scale stay put as the model gets wider?

muP promises that every activation coordinate keeps the same size at every width, at
initialisation and through training, so that hyperparameters tuned on a narrow model carry
over to a wide one. The coordinate check (Tensor Programs V, §D) tests that promise
directly: train the same model at several widths for a few steps, with the same base
learning rate, and record the mean absolute value of each layer's output (the L1 norm per
coordinate, ``mean |x|``). Under muP the curves over width are flat; under the standard
parametrisation (SP, ``model.mup: false``) the updates add ``lr · width``-sized pieces to the
hidden and output activations, which grow with width, the faster the longer it trains.

Plain PyTorch on one process: the model of :mod:`fljob.trainer.model`, its muP parameter
groups and the spec's optimizer, trained on the bundled text (tokenised by a small BPE).
Only the width changes between runs: ``head_dim`` and the query/KV head ratio stay those of
the spec's flavor (the head count grows), depth and ``base_dim`` stay fixed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fljob.spec.models import JobSpec
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import args_for_spec, flavor_name, get_flavor
from fljob.trainer.model.model import MuPTransformer, TransformerBlock
from fljob.trainer.model.mup import mup_param_groups
from fljob.trainer.optim.builder import QUASI_HYPERBOLIC, WEIGHT_DECAY_MODES, build_optimizer

PARAMETRISATIONS = ("mup", "sp")
FFN_MULTIPLE_OF = 8
MIN_OCTAVES = 4.0
"""Smallest y-range of a plot column, in factors of 2."""
CORPUS_CHARS = 200_000
"""Text the check tokenises: a few steps of small batches need far less, and BPE training
on the whole bundled corpus would cost more than the narrow runs."""
TITLES = {"mup": "muP", "sp": "standard parametrisation (SP)"}
# Plot columns. Block layers ("block<i>.<kind>") are averaged over blocks in the plot;
# the JSON keeps every layer.
PLOT_KINDS = ("embedding", "attention", "ffn", "residual", "final_norm", "logits")
KIND_TITLES = {"embedding": "token embedding", "attention": "attention output",
               "ffn": "FFN output", "residual": "block output (residual stream)",
               "final_norm": "final norm", "logits": "logits"}


@dataclass(frozen=True)
class CoordCheckConfig:
    """What to sweep and how to train at each width (the spec supplies the rest)."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    steps: int = 5
    optimizer: str | None = None  # None: the spec's
    batch_size: int = 4
    seq_len: int = 64
    vocab_size: int | None = None  # None: the flavor's
    seed: int = 0


@dataclass
class CoordCheckResult:
    """``scales[parametrisation][layer][t][i]``: mean |activation| of ``layer`` at
    ``widths[i]`` in the forward pass after ``t`` optimizer steps (``t = 0`` is the init)."""

    config: dict[str, Any]
    widths: list[int]
    layers: list[str]
    scales: dict[str, dict[str, list[list[float]]]]

    def slope(self, parametrisation: str, layer: str, t: int = -1) -> float:
        """Least-squares slope of log2(scale) against log2(width): 0 is flat, 1 is
        proportional to width, 0.5 grows as its square root."""
        return loglog_slope(self.widths, self.scales[parametrisation][layer][t])

    def kind_scales(self, parametrisation: str, kind: str) -> list[list[float]]:
        """[t][i] for one plot column: the layer itself, or the mean over blocks."""
        members = [name for name in self.layers if layer_kind(name) == kind]
        rows = [self.scales[parametrisation][name] for name in members]
        return [[sum(r[t][i] for r in rows) / len(rows) for i in range(len(self.widths))]
                for t in range(len(rows[0]))]

    def to_json(self) -> dict[str, Any]:
        last = {p: {layer: self.slope(p, layer) for layer in self.layers} for p in self.scales}
        return {**dataclasses.asdict(self), "slope_at_last_step": last}


def loglog_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    xs = [math.log2(w) for w in widths]
    ys = [math.log2(v) for v in values]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    return num / sum((x - x_mean) ** 2 for x in xs)


def layer_kind(name: str) -> str:
    """'block3.ffn' -> 'ffn'; 'logits' -> 'logits'."""
    return name.split(".", 1)[1] if name.startswith("block") else name


def args_at_width(base: ModelArgs, width: int, *, mup: bool) -> ModelArgs:
    """``base`` at another width: same head_dim, head ratio, depth and muP base shape."""
    head_dim = base.head_dim
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the flavor's head_dim {head_dim}")
    n_heads = width // head_dim
    kv_heads = n_heads * base.kv_heads // base.n_heads
    if kv_heads * base.n_heads != n_heads * base.kv_heads:
        raise ValueError(f"width {width} gives {n_heads} heads, which do not keep the flavor's "
                         f"{base.n_heads}:{base.kv_heads} query:KV head ratio")
    # FFN width rounded to a multiple of 8, not the flavor's 64 or 256: coarse rounding would
    # give narrow models a relatively wider FFN (ratio 3 at 64, 2.69 at 1024 with 64), a
    # width effect that is not the parametrisation's.
    return dataclasses.replace(base, dim=width, n_heads=n_heads,
                               n_kv_heads=None if kv_heads == n_heads else kv_heads,
                               ffn_multiple_of=FFN_MULTIPLE_OF, mup_enabled=mup)


def watched_modules(model: MuPTransformer) -> dict[str, nn.Module]:
    """The layers whose output the check records, by label (MUP.md, "Coordinate checks")."""
    watched: dict[str, nn.Module] = {"embedding": model.tok_embeddings}
    for i, block in model.layers.items():
        assert isinstance(block, TransformerBlock)
        watched[f"block{i}.attention"] = block.attention
        watched[f"block{i}.ffn"] = block.feed_forward
        watched[f"block{i}.residual"] = block
    watched["final_norm"] = model.norm
    watched["logits"] = model.output  # output(norm(h) * output_mult) is the logits
    return watched


@contextmanager
def record_scales(model: MuPTransformer) -> Iterator[dict[str, float]]:
    """Forward hooks that store ``mean |output|`` of every watched layer, by label."""
    scales: dict[str, float] = {}

    def hook(label: str):
        def store(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            scales[label] = output.detach().abs().mean().item()
        return store

    handles = [m.register_forward_hook(hook(label)) for label, m in watched_modules(model).items()]
    try:
        yield scales
    finally:
        for handle in handles:
            handle.remove()


def token_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, count: int,
                  seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``seq_len + 1`` consecutive tokens from random offsets; the
    same for every width, so widths differ in nothing but the width."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (count, batch_size), generator=generator)
    return [torch.stack([tokens[s : s + seq_len + 1] for s in row.tolist()]) for row in starts]


def bundled_tokens(vocab_size: int, chars: int = CORPUS_CHARS) -> torch.Tensor:
    """The first ``chars`` characters of the bundled text (whole documents) through a
    byte-level BPE of at most ``vocab_size`` ids, as one token stream."""
    from fljob.trainer.data.text import bundled_documents
    from fljob.trainer.data.tokenizer import train_bpe

    docs, total = [], 0
    for doc in bundled_documents():
        if total >= chars:
            break
        docs.append(doc)
        total += len(doc)
    tokenizer = train_bpe(docs, vocab_size)
    return torch.tensor([i for enc in tokenizer.encode_batch(docs) for i in enc.ids])


def train_and_record(args: ModelArgs, spec: JobSpec, optimizer: str,
                     batches: list[torch.Tensor], seed: int) -> list[dict[str, float]]:
    """Scales in the forward pass of every batch; an optimizer step after each but the last.

    The spec's optimizer settings at a constant learning rate, without gradient clipping: no
    schedule or clipping factor (which depends on the global gradient norm, hence on the
    width) blurs what the parametrisation alone does.
    """
    torch.manual_seed(seed)
    model = MuPTransformer(args)
    model.init_weights()
    opt = spec.optimizer
    groups = mup_param_groups(model, args, lr=opt.lr, weight_decay=opt.weight_decay, eps=opt.eps,
                              weight_decay_mode=WEIGHT_DECAY_MODES[optimizer])
    hyper: dict[str, Any] = {"betas": tuple(opt.betas), "foreach": True}
    if optimizer in QUASI_HYPERBOLIC:
        hyper["nus"] = tuple(opt.nus)
    optim = build_optimizer(optimizer, groups, lr=opt.lr, eps=opt.eps,
                            weight_decay=opt.weight_decay, **hyper)
    history = []
    for t, batch in enumerate(batches):
        with record_scales(model) as scales:
            logits = model(batch[:, :-1])
        history.append(scales)
        if t == len(batches) - 1:
            break
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    return history


def sweep_args(spec: JobSpec, config: CoordCheckConfig) -> dict[tuple[str, int], ModelArgs]:
    """The model of every (parametrisation, width) run; ValueError for a width the flavor's
    heads cannot make (cheap: call it to check widths before the sweep)."""
    vocab_size = config.vocab_size or get_flavor(flavor_name(spec)).vocab_size
    base = args_for_spec(spec, vocab_size=vocab_size)
    return {(p, w): args_at_width(base, w, mup=p == "mup")
            for p in PARAMETRISATIONS for w in config.widths}


def run_coord_check(spec: JobSpec, config: CoordCheckConfig,
                    progress: bool = True) -> CoordCheckResult:
    """Train every (parametrisation, width) pair ``config.steps`` steps and collect scales."""
    from tqdm import tqdm

    runs = sweep_args(spec, config)
    base = next(iter(runs.values()))
    optimizer = config.optimizer or spec.optimizer.name
    batches = token_windows(bundled_tokens(base.vocab_size), config.batch_size, config.seq_len,
                            config.steps + 1, config.seed)
    scales: dict[str, dict[str, list[list[float]]]] = {}
    layers: list[str] = []
    for (parametrisation, _), args in tqdm(runs.items(), desc="coord-check", unit="run",
                                           disable=not progress):
        history = train_and_record(args, spec, optimizer, batches, config.seed)
        layers = list(history[0])
        by_layer = scales.setdefault(parametrisation, {name: [[] for _ in history] for name in layers})
        for t, step_scales in enumerate(history):
            for name, value in step_scales.items():
                by_layer[name][t].append(value)
    described = {**dataclasses.asdict(config), "optimizer": optimizer, "lr": spec.optimizer.lr,
                 "flavor": flavor_name(spec), "head_dim": base.head_dim,
                 "n_layers": base.n_layers, "base_dim": base.base_dim,
                 "vocab_size": base.vocab_size}
    return CoordCheckResult(described, list(config.widths), layers, scales)


def plot(result: CoordCheckResult, path: Path) -> None:
    """One row per parametrisation, one column per layer kind, one line per step.

    Rows share each column's y-axis, and every column spans at least ``MIN_OCTAVES``, so
    a flat line looks flat and muP and SP are read on the same scale.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = len(next(iter(result.scales["mup"].values())))
    colors = plt.get_cmap("viridis")(torch.linspace(0, 0.9, steps).tolist())
    fig, axes = plt.subplots(len(PARAMETRISATIONS), len(PLOT_KINDS), sharex=True, sharey="col",
                             figsize=(3.1 * len(PLOT_KINDS), 3.0 * len(PARAMETRISATIONS) + 0.6),
                             squeeze=False)
    for col, kind in enumerate(PLOT_KINDS):
        octaves: list[float] = []
        for row, parametrisation in enumerate(PARAMETRISATIONS):
            ax = axes[row][col]
            per_step = result.kind_scales(parametrisation, kind)
            for t, values in enumerate(per_step):
                ax.plot(result.widths, values, marker="o", markersize=3, color=colors[t],
                        label="init" if t == 0 else f"after {t} step{'s' if t > 1 else ''}")
                octaves += [math.log2(v) for v in values]
            slope = loglog_slope(result.widths, per_step[-1])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xticks(result.widths, [str(w) for w in result.widths])
            ax.set_title(f"{KIND_TITLES[kind]}\nslope {slope:+.2f}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{TITLES[parametrisation]}\nmean |activation|", fontsize=9)
            if row == len(PARAMETRISATIONS) - 1:
                ax.set_xlabel("width (dim)", fontsize=9)
        middle = (max(octaves) + min(octaves)) / 2
        half = max((max(octaves) - min(octaves)) / 2 + 0.25, MIN_OCTAVES / 2)
        axes[0][col].set_ylim(2 ** (middle - half), 2 ** (middle + half))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=steps, fontsize=8, frameon=False)
    cfg = result.config
    fig.suptitle(
        f"muP coordinate check: flavor {cfg['flavor']} ({cfg['n_layers']} layers, head_dim "
        f"{cfg['head_dim']}, base width {cfg['base_dim']}), {cfg['optimizer']} lr {cfg['lr']:g}, "
        f"{cfg['steps']} steps. Flat lines: width-independent activations (muP's promise); "
        f"slope = log-log slope after the last step; block layers averaged over blocks",
        fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: CoordCheckResult, png: Path) -> tuple[Path, Path]:
    """The plot at ``png`` and the raw numbers beside it (same name, ``.json``)."""
    plot(result, png)
    raw = png.with_suffix(".json")
    raw.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return png, raw


def slope_table(result: CoordCheckResult) -> str:
    """Log-log slope after the last step, per plot column, muP beside SP."""
    lines = [f"{'layer':<32} {'muP slope':>10} {'SP slope':>10}"]
    for kind in PLOT_KINDS:
        slopes = [loglog_slope(result.widths, result.kind_scales(p, kind)[-1])
                  for p in PARAMETRISATIONS]
        lines.append(f"{KIND_TITLES[kind]:<32} {slopes[0]:>+10.2f} {slopes[1]:>+10.2f}")
    return "\n".join(lines)
