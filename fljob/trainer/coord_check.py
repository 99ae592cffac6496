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
the spec's flavor (the head count grows), depth and ``base_dim`` stay fixed. Every width
runs with several seeds (init and batches) and the scales are averaged over them, because
one run's slope wanders by up to 0.4 at three widths.

The verdict (:func:`verdict`) bounds the log-log slopes after the last step: every muP
layer kind flat within ``max_mup_slope``, and SP's attention and FFN outputs rising with a
slope of at least ``min_sp_slope`` (the control: a run in which SP does not grow could not
show a muP error either). MUP.md, "Coordinate checks", has the numbers behind the defaults.
"""

from __future__ import annotations

import dataclasses
import io
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

from fljob.files import OutFile, write_files
from fljob.spec.models import JobSpec
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import args_for_spec, flavor_name, get_flavor, with_shape
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
# The SP control: layer kinds whose slope SP's updates raise steadily (each adds lr x width
# to them). The embedding, residual stream and final norm sit behind norms in both
# parametrisations; SP's logits grow too, but at lr 3e-3 the widest SP models overshoot
# (mean |logit| 1.8, 1.9, 0.7, 3.6 over steps 2..5 at width 1024), so their slope is no
# steady control.
SP_CONTROL_KINDS = ("attention", "ffn")
KIND_TITLES = {"embedding": "token embedding", "attention": "attention output",
               "ffn": "FFN output", "residual": "block output (residual stream)",
               "final_norm": "final norm", "logits": "logits"}


@dataclass(frozen=True)
class CoordCheckConfig:
    """What to sweep and how to train at each width (the spec supplies the rest)."""

    widths: tuple[int, ...] = (128, 256, 512, 1024)
    steps: int = 5
    optimizer: str | None = None  # None: the spec's
    batch_size: int = 4
    seq_len: int = 64
    vocab_size: int | None = None  # None: the flavor's
    seeds: int = 3  # runs per width, seeds 0 .. seeds-1; the scales are averaged over them


@dataclass(frozen=True)
class Bounds:
    """Verdict thresholds on the log-log slope after the last step (see ``verdict``)."""

    max_mup_slope: float = 0.15
    min_sp_slope: float = 1.2


@dataclass(frozen=True)
class Check:
    """One row of the verdict: a layer kind's slope in one parametrisation, and its bound
    (muP: |slope| <= bound; SP: slope >= bound)."""

    parametrisation: str
    kind: str
    slope: float
    bound: float

    @property
    def passed(self) -> bool:
        if self.parametrisation == "mup":
            return abs(self.slope) <= self.bound
        return self.slope >= self.bound


@dataclass
class CoordCheckResult:
    """``scales[parametrisation][layer][t][i]``: mean |activation| of ``layer`` at
    ``widths[i]`` in the forward pass after ``t`` optimizer steps (``t = 0`` is the init),
    averaged over the seeds."""

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
        return mean_rows([self.scales[parametrisation][name] for name in members])

    def kind_slope(self, parametrisation: str, kind: str, t: int = -1) -> float:
        """``slope`` of one plot column (block layers averaged over blocks)."""
        return loglog_slope(self.widths, self.kind_scales(parametrisation, kind)[t])

    def to_json(self) -> dict[str, Any]:
        last = {p: {layer: self.slope(p, layer) for layer in self.layers} for p in self.scales}
        return {**dataclasses.asdict(self), "slope_at_last_step": last}


def mean_rows(tables: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Element-wise mean of equally shaped [t][i] tables."""
    return [[sum(col) / len(col) for col in zip(*rows, strict=True)]
            for rows in zip(*tables, strict=True)]


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
    """``base`` at another width (``flavors.with_shape``: same head_dim, head ratio, depth
    and muP base shape); ValueError for a width the heads cannot make."""
    # FFN width rounded to a multiple of 8, not the flavor's 64 or 256: coarse rounding
    # gives narrow models a relatively wider FFN (ratio 4 at 128, 3 at 256 with 256). muP
    # scales w2 by its own fan-in ratio, so its output stays flat either way, but a wider
    # FFN is a bigger model, a width effect that is not the parametrisation's.
    return dataclasses.replace(with_shape(base, width=width), ffn_multiple_of=FFN_MULTIPLE_OF,
                               mup_enabled=mup)


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
    """Train every (parametrisation, width) pair ``config.steps`` steps with every seed and
    collect the scales, averaged over the seeds."""
    from tqdm import tqdm

    runs = sweep_args(spec, config)
    base = next(iter(runs.values()))
    optimizer = config.optimizer or spec.optimizer.name
    tokens = bundled_tokens(base.vocab_size)
    per_seed: list[dict[str, dict[str, list[list[float]]]]] = []
    layers: list[str] = []
    with tqdm(total=len(runs) * config.seeds, desc="coord-check", unit="run",
              disable=not progress) as bar:
        for seed in range(config.seeds):
            batches = token_windows(tokens, config.batch_size, config.seq_len, config.steps + 1,
                                    seed)
            scales: dict[str, dict[str, list[list[float]]]] = {}
            for (parametrisation, _), args in runs.items():
                history = train_and_record(args, spec, optimizer, batches, seed)
                layers = list(history[0])
                by_layer = scales.setdefault(parametrisation,
                                             {name: [[] for _ in history] for name in layers})
                for t, step_scales in enumerate(history):
                    for name, value in step_scales.items():
                        by_layer[name][t].append(value)
                bar.update()
            per_seed.append(scales)
    averaged = {p: {name: mean_rows([s[p][name] for s in per_seed]) for name in layers}
                for p in PARAMETRISATIONS}
    described = {**dataclasses.asdict(config), "optimizer": optimizer, "lr": spec.optimizer.lr,
                 "flavor": flavor_name(spec), "head_dim": base.head_dim,
                 "n_layers": base.n_layers, "base_dim": base.base_dim,
                 "vocab_size": base.vocab_size}
    return CoordCheckResult(described, list(config.widths), layers, averaged)


def verdict(result: CoordCheckResult, bounds: Bounds) -> list[Check]:
    """Every muP layer kind must be flat, and SP's growing kinds must grow (the control:
    without it a flat muP line could mean a check too short to see anything)."""
    return ([Check("mup", kind, result.kind_slope("mup", kind), bounds.max_mup_slope)
             for kind in PLOT_KINDS]
            + [Check("sp", kind, result.kind_slope("sp", kind), bounds.min_sp_slope)
               for kind in SP_CONTROL_KINDS])


def verdict_report(result: CoordCheckResult, checks: Sequence[Check]) -> str:
    """The slope table with bounds and PASS/FAIL per layer kind, and a closing line."""
    by_key = {(c.parametrisation, c.kind): c for c in checks}
    cfg = result.config
    seeds = f"{cfg['seeds']} seed{'s' if cfg['seeds'] > 1 else ''}"
    lines = [(f"verdict at widths {','.join(map(str, result.widths))}: log-log slope of mean "
              f"|activation| against width after {cfg['steps']} steps, averaged over {seeds} "
              f"(0 = flat, 1 = grows like the width)"),
             f"{'layer':<32} {'muP slope':>9}  {'bound':<14} {'SP slope':>8}  bound"]
    for kind in PLOT_KINDS:
        cells = []
        for p, relation in (("mup", "|s|<="), ("sp", "s>=")):
            check = by_key.get((p, kind))
            judged = f"{relation}{check.bound:.2f} {'PASS' if check.passed else 'FAIL'}" \
                if check else ""
            cells.append(f"{result.kind_slope(p, kind):>+9.2f}  {judged:<14}")
        lines.append(f"{KIND_TITLES[kind]:<32} {cells[0]}{cells[1]}".rstrip())
    mup_failed = [c for c in checks if c.parametrisation == "mup" and not c.passed]
    sp_failed = [c for c in checks if c.parametrisation == "sp" and not c.passed]
    if mup_failed:
        named = ", ".join(f"{KIND_TITLES[c.kind]} {c.slope:+.2f}" for c in mup_failed)
        lines.append(f"FAIL: under muP these activations change with width beyond "
                     f"|slope| {mup_failed[0].bound:.2f}: {named}")
    if sp_failed:
        named = ", ".join(f"{KIND_TITLES[c.kind]} {c.slope:+.2f}" for c in sp_failed)
        lines.append(f"FAIL (inconclusive): SP did not grow with width (slope below "
                     f"{sp_failed[0].bound:.2f}: {named}), so this run could not have shown a "
                     f"muP error either; train more --steps or with a larger lr")
    if not mup_failed and not sp_failed:
        lines.append("PASS: muP activations are flat across width and SP's grow")
    return "\n".join(lines)


def plot(result: CoordCheckResult, checks: Sequence[Check]) -> bytes:
    """The PNG: one row per parametrisation, one column per layer kind, one line per step; each
    panel's title has the slope after the last step and its verdict.

    Rows share each column's y-axis, and every column spans at least ``MIN_OCTAVES``, so
    a flat line looks flat and muP and SP are read on the same scale.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    by_key = {(c.parametrisation, c.kind): c for c in checks}
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
            check = by_key.get((parametrisation, kind))
            mark = "" if check is None else "  PASS" if check.passed else "  FAIL"
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xticks(result.widths, [str(w) for w in result.widths])
            ax.set_title(f"{KIND_TITLES[kind]}\nslope {slope:+.2f}{mark}", fontsize=9)
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
        f"{cfg['steps']} steps, mean of {cfg['seeds']} seeds. Flat lines: width-independent "
        f"activations (muP's promise); slope = log-log slope after the last step; block layers "
        f"averaged over blocks",
        fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(result: CoordCheckResult, checks: Sequence[Check],
                  png: Path) -> tuple[Path, Path]:
    """The plot at ``png`` and the raw numbers and the verdict beside it (``.json``): both or
    neither (:func:`fljob.files.write_files`: a full or read-only folder leaves nothing)."""
    rows = [{**dataclasses.asdict(c), "passed": c.passed} for c in checks]
    data = {**result.to_json(), "verdict": {"passed": all(c.passed for c in checks),
                                            "checks": rows}}
    raw = json.dumps(data, indent=1) + "\n"
    png_path, raw_path = write_files(png.parent, [OutFile(png.name, plot(result, checks)),
                                                  OutFile(png.with_suffix(".json").name, raw)])
    return png_path, raw_path
