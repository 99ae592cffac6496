"""What metric collection costs per training step, as a share of the step.

One muP model and optimizer (torchtitan's train step, as in ``trainer_throughput.py``) run
in blocks of steps under these settings, the first being the anchor:

* ``no metrics`` -- the step alone, the host synchronised only at block ends;
* ``step metrics`` -- what a logged step adds every step (:class:`StepMetrics`): loss and
  gradient norm read to the host (a synchronisation), device memory statistics, and the
  record built by ``fljob_record`` written to the JSONL file and the Prometheus collectors;
* ``step metrics + optimizer stats every 1 / 10 steps`` -- plus
  :class:`fljob.trainer.metrics.optimizer_stats.OptimizerStats` at that interval;
* ``optimizer stats every 1 / 10 steps`` -- the statistics alone.

Step-time differences of a fraction of a percent drown in run-to-run noise, so the cost of
one statistics step is also timed on its own (``before_step`` + ``optimizer.step()`` +
``after_step`` minus ``optimizer.step()``, median of many); at interval N it is paid once
every N steps.

    python bench/metrics_cost.py                    # GPU: 1.06B flavor, bf16, compile on
    python bench/metrics_cost.py --cpu              # CPU: tiny flavor, float32, 1 thread
    python bench/metrics_cost.py --smoke            # CPU dry run

Writes ``bench/results/metrics_cost-<device>[-smoke].md``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, header, median, pick_device, table, time_ms, write_results
from bench.trainer_throughput import (
    Variant,
    build_model,
    build_optimizer,
    job_config,
    train_step_fn,
)
from fljob.trainer.device import use_device

ANCHOR = "no metrics"
SETTINGS: dict[str, tuple[bool, int | None]] = {
    # name: (step metrics every step, optimizer statistics interval or None)
    ANCHOR: (False, None),
    "step metrics": (True, None),
    "step metrics + optimizer stats every 1": (True, 1),
    "step metrics + optimizer stats every 10": (True, 10),
    "optimizer stats every 1": (False, 1),
    "optimizer stats every 10": (False, 10),
}


def step_clock(device: torch.device) -> Callable[[], float]:
    """Wall time on a GPU; on the (shared) CPU the process's CPU time, which other jobs on
    the machine do not inflate (the CPU run uses one intra-op thread, so no spinning)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


class StepMetrics:
    """What a logged step adds on rank 0, through fljob's own record builder and sinks.

    Loss and gradient norm are read to the host (the synchronisation torchtitan's logging
    makes), device memory statistics are read, and the record (with the optimizer
    statistics when the step has them) goes through ``fljob_record`` to the JSONL file and
    the Prometheus collectors (the exporter's HTTP thread only serves scrapes).
    """

    def __init__(self, path: Path, optimizer: torch.optim.Optimizer, device: torch.device,
                 tokens_per_step: int) -> None:
        from fljob.trainer.metrics.jsonl import JsonlLogger
        from fljob.trainer.metrics.prometheus import TrainingMetrics

        self.jsonl, self.prometheus = JsonlLogger(path), TrainingMetrics("bench", "bench")
        self.optimizer, self.device, self.tokens = optimizer, device, tokens_per_step
        self.seen, self.start, self.last = 0, time.perf_counter(), time.perf_counter()

    def log(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
            optimizer_stats: dict[str, float] | None) -> None:
        from fljob.trainer.metrics.processor import fljob_record

        now = time.perf_counter()
        step_s, self.last = now - self.last, now
        self.seen += self.tokens
        memory = torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else 0
        loss_value = loss.item()
        metrics = {
            "loss_metrics/global_avg_loss": loss_value, "loss_metrics/global_max_loss": loss_value,
            "grad_norm": grad_norm.item(), "throughput(tps)": self.tokens / step_s,
            "n_tokens_seen": self.seen, "time_metrics/end_to_end(s)": step_s,
            "time_metrics/data_loading(s)": 0.0, "mfu(%)": 0.0,
            "memory/max_reserved(GiB)": memory / 2**30, "window/tokens": self.tokens,
            "window/data_wait_s": 0.0, "window/max_reserved_bytes": memory,
            **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
            **(optimizer_stats or {}),
        }
        record = fljob_record(metrics, world_size=1, elapsed_s=now - self.start)
        self.jsonl.log(record, step)
        self.prometheus.observe(record, step)


def run_block(step: Callable, steps: int, first: int, device: torch.device,
              metrics: StepMetrics | None, stats) -> float:
    """Milliseconds per step over ``steps`` steps numbered from ``first``."""
    clock = step_clock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    for number in range(first, first + steps):
        values: dict[str, float] | None = None
        if stats is not None:
            # The hooks FljobMetricsProcessor.watch registers around optimizer.step().
            def after(*_: object, n: int = number) -> None:
                nonlocal values
                values = stats.after_step(n)

            handles = (stats.optimizer.register_step_pre_hook(
                           lambda *_, n=number: stats.before_step(n)),
                       stats.optimizer.register_step_post_hook(after))
        loss, grad_norm = step()
        if stats is not None:
            for handle in handles:
                handle.remove()
        if metrics is not None:
            metrics.log(number, loss, grad_norm, values)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - t0) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="CPU run: tiny flavor, float32, no compile, batch 8 x 128")
    parser.add_argument("--flavor", default="1.06B")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--optimizer", default="adopt")
    parser.add_argument("--implementation", default="fused", choices=["fused", "foreach"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed repetitions of one statistics step on its own")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run, 1 short block")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.cpu or args.smoke:
        args.flavor, args.batch, args.seq_len, args.implementation = "1.25M", 8, 128, "foreach"
        device, compile_model, autocast = torch.device("cpu"), False, None
        torch.set_num_threads(1)
    else:
        device, compile_model, autocast = pick_device("auto"), True, torch.bfloat16
    if args.smoke:
        args.warmup, args.steps, args.blocks, args.repeat = 1, 10, 1, 2
    use_device("cuda" if device.type == "cuda" else "cpu")
    from torchtitan.components.loss import build_cross_entropy_loss

    from fljob.trainer.metrics.optimizer_stats import OptimizerStats

    suffix = "-smoke" if args.smoke else ""
    out = args.out or RESULTS / f"metrics_cost-{device.type}{suffix}.md"

    variant = Variant("muP", "mup", args.optimizer, args.implementation)
    config = job_config(args.seq_len, args.batch, compile_model)
    model = build_model(variant, args.flavor, config, device)
    optimizer = build_optimizer(variant, model)
    data = torch.randint(model.model_args.vocab_size, (args.batch, args.seq_len + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    step = train_step_fn(model, optimizer, build_cross_entropy_loss(config), data[:, :-1],
                         data[:, 1:], device, autocast)
    for _ in range(args.warmup):
        step()

    per_step: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = StepMetrics(Path(tmp) / "metrics.jsonl", optimizer, device,
                              args.batch * args.seq_len)
        number = 1
        for _ in tqdm(range(args.blocks), desc="blocks"):
            # Settings interleaved block by block, so that drift hits all of them alike.
            for name, (log, interval) in SETTINGS.items():
                stats = OptimizerStats(optimizer, interval) if interval else None
                per_step[name].append(run_block(step, args.steps, number, device,
                                                metrics if log else None, stats))
                number += args.steps
                del stats
                gc.collect()
        metrics.jsonl.close()

    # One statistics step on its own, against the bare optimizer step it wraps.
    stats = OptimizerStats(optimizer, 1)
    counter = iter(range(10**9))

    def with_stats() -> None:
        n = next(counter)
        stats.before_step(n)
        optimizer.step()
        stats.after_step(n)

    clock = step_clock(device)
    bare = median(time_ms(optimizer.step, device, warmup=2, repeat=args.repeat, clock=clock))
    wrapped = median(time_ms(with_stats, device, warmup=2, repeat=args.repeat, clock=clock))
    stats_ms = wrapped - bare

    step_ms = {name: median(v) for name, v in per_step.items()}
    anchor = step_ms[ANCHOR]
    rows = [[name, f"{ms:.2f}", f"{ms - anchor:+.2f}", f"{100 * (ms - anchor) / anchor:+.2f}"]
            for name, ms in step_ms.items()]
    n_params = sum(p.numel() for p in model.parameters())
    lines = header("Metric collection cost per training step", device)
    lines += [
        (f"- model: muP {args.flavor} ({n_params / 1e6:.1f}M parameters), {len(optimizer.param_groups)} "
        f"muP groups, {args.optimizer} {args.implementation}, batch {args.batch} x {args.seq_len}, "
        f"{'bf16 autocast, compile on' if autocast else 'float32, compile off'}"),
        (f"- timing: median over {args.blocks} blocks of {args.steps} steps per setting "
         "(settings interleaved), "
         + ("wall clock with the device synchronised at block ends" if device.type == "cuda"
            else "process CPU time, 1 intra-op thread (the machine is shared)")),
        "- target: optimizer statistics at interval 10 cost <= 1% of step time",
        "",
        "## One statistics step, timed on its own",
        "",
        (f"- optimizer step alone: {bare:.3f} ms; with before_step/after_step: {wrapped:.3f} ms "
        f"(median of {args.repeat})"),
        (f"- cost of one statistics step: {stats_ms:.3f} ms = {100 * stats_ms / anchor:.2f}% of a "
        f"training step ({anchor:.2f} ms)"),
        (f"- at interval 10: {stats_ms / 10:.3f} ms per step = {10 * stats_ms / anchor:.3f}% of "
        "step time"),
        "",
        "## Step time per setting",
        "",
    ]
    lines += table(["setting", "ms per step", "vs anchor ms", "vs anchor %"], rows)
    write_results(out, lines)


if __name__ == "__main__":
    main()
