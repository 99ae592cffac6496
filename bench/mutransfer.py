"""muTransfer on one GPU: does the optimal learning rate stay put as the model gets wider?

Everything runs through fljob itself, as a user would: `fljob data prepare` splits a corpus
into train and validation shards, one spec with a `sweep:` block (widths x learning rates x
seeds x muP/SP) runs through `fljob submit --backend local` with several trials sharing the
GPU, and `fljob sweep report` writes report.json, transfer.png and best.yaml.

The corpus is the source code of the running Python's standard library (plus the pydoc
topics): real text that exists offline on every machine, large enough (~10M tokens) that a
few hundred steps of a 2048-wide model do not repeat data.

    python bench/mutransfer.py prepare --work /tmp/mut            # corpus -> MDS train/validation
    python bench/mutransfer.py sweep --work /tmp/mut              # the 5 x 7 x 2 x 2 sweep + report
    python bench/mutransfer.py throughput --work /tmp/mut         # sequential vs packed trials/hour
    python bench/mutransfer.py sweep --work /tmp/mut --name attn --parametrisation mup \
        --widths 256 1024 --grid model.attention_scale=standard     # a follow-up: one knob under muP

Each step appends its figures to <work>/results.json; bench/results/mutransfer.md is written
from them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (128, 256, 512, 1024, 2048)
LR_EXPONENTS = tuple(range(-12, -5))  # 2^-12 .. 2^-6: seven learning rates on a x2 grid
SEQ_LEN = 256


def fljob(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the fljob CLI of this checkout, echoing its output."""
    argv = [sys.executable, "-m", "fljob.cli", *args]
    print("+", " ".join(argv), flush=True)
    proc = subprocess.run(argv, text=True, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"fljob {args[0]} exited {proc.returncode}")
    return proc


def record(work: Path, key: str, value: Any) -> None:
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=1) + "\n")


def corpus(work: Path) -> Path:
    """The standard library's Python files (sorted, so the corpus is the same every time) and
    the pydoc topics, one JSONL document each."""
    from pydoc_data.topics import topics

    path = work / "corpus.jsonl"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps({"text": topics[name]}) + "\n" for name in sorted(topics))
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(json.dumps({"text": text}) + "\n")
    return path


def prepare(args: argparse.Namespace) -> None:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = corpus(work)
    fljob("data", "prepare", str(source), str(work / "data"), "--seq-len", str(SEQ_LEN),
          "--validation-fraction", "0.02", "--overwrite")
    record(work, "prepare", {"corpus_bytes": source.stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
                             "python": sys.version.split()[0]})


def sweep_spec(work: Path, name: str, *, widths: tuple[int, ...], exponents: tuple[int, ...], seeds: tuple[int, ...],
               mup: tuple[bool, ...], steps: int, parallel: int, batch: int,
               extra_grid: dict[str, list[Any]] | None = None) -> Path:
    """The sweep as one fljob spec: the 7.61M flavor (the muP base: width 256, depth 4,
    head_dim 64) at each width, AdamW with warm-up and linear decay, bf16, held-out loss;
    ``extra_grid`` adds swept fields (e.g. ``model.output_alpha``) to the product."""
    spec: dict[str, Any] = {
        "name": name,
        "run_dir": str(work / "runs" / "{name}"),
        "model": {"flavor": "7.61M"},
        "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0},
        "schedule": {"warmup_steps": max(1, steps // 10), "decay_type": "linear"},
        "training": {"steps": steps, "local_batch_size": batch, "seq_len": SEQ_LEN, "dtype": "bfloat16",
                     "log_interval": 10, "validation_interval": steps // 4, "validation_batches": 16},
        "data": {"streams": [{"uri": str(work / "data" / "train")}],
                 "validation": [{"uri": str(work / "data" / "validation")}]},
        "checkpoint": {"interval_steps": 100000, "keep_latest": 1},
        "metrics": {"enabled": False, "optimizer_interval": 100000},
        "sweep": {
            "grid": {"model.mup": list(mup), "model.width": list(widths),
                     "optimizer.lr": [2.0 ** e for e in exponents], "training.seed": list(seeds),
                     **(extra_grid or {})},
            "name_format": "{name}-{index}",
            "parallel": parallel,
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_sweep(work: Path, spec: Path, name: str) -> float:
    t0 = time.perf_counter()
    fljob("submit", "--backend", "local", str(spec), check=False)
    seconds = time.perf_counter() - t0
    fljob("status", f"local://{work / 'runs' / name}", check=False)
    return seconds


PARAMETRISATIONS = {"both": (True, False), "mup": (True,), "sp": (False,)}


def grid_entry(text: str) -> tuple[str, list[Any]]:
    """``FIELD=V1,V2`` (values read as YAML scalars) as one more swept field."""
    field, _, values = text.partition("=")
    if not field or not values:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: write FIELD=V1,V2,...")
    return field, [yaml.safe_load(v) for v in values.split(",")]


def sweep(args: argparse.Namespace) -> None:
    work, name = args.work, args.name
    spec = sweep_spec(work, name, widths=tuple(args.widths), exponents=tuple(args.lr_exponents),
                      seeds=tuple(args.seeds), mup=PARAMETRISATIONS[args.parametrisation], steps=args.steps,
                      parallel=args.parallel, batch=args.batch, extra_grid=dict(args.grid))
    seconds = run_sweep(work, spec, name)
    report = work / "report" if name == "mutransfer" else work / f"report-{name}"
    fljob("sweep", "report", str(work / "runs" / name), "-o", str(report), check=False)
    record(work, name, {"seconds": round(seconds, 1), "parallel": args.parallel, "steps": args.steps,
                        "batch": args.batch, "widths": args.widths, "lr_exponents": args.lr_exponents,
                        "seeds": args.seeds, "parametrisation": args.parametrisation, "grid": dict(args.grid)})


def throughput(args: argparse.Namespace) -> None:
    """The same small trials one after another and packed `--parallel` at a time."""
    work = args.work
    figures = {}
    for parallel in (1, args.parallel):
        name = f"throughput-p{parallel}"
        spec = sweep_spec(work, name, widths=tuple(args.widths), exponents=tuple(args.lr_exponents),
                          seeds=(0,), mup=(True,), steps=args.steps, parallel=parallel, batch=args.batch)
        seconds = run_sweep(work, spec, name)
        trials = len(args.widths) * len(args.lr_exponents)
        figures[parallel] = {"trials": trials, "seconds": round(seconds, 1),
                             "trials_per_hour": round(trials * 3600 / seconds, 1)}
        print(f"parallel {parallel}: {trials} trials in {seconds:.1f} s", flush=True)
    speedup = figures[args.parallel]["trials_per_hour"] / figures[1]["trials_per_hour"]
    record(work, "throughput", {"widths": args.widths, "steps": args.steps, "batch": args.batch,
                                "runs": figures, "speedup": round(speedup, 2)})
    print(f"packed ({args.parallel} at a time) / sequential: {speedup:.2f}x trials per hour", flush=True)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("prepare", "sweep", "throughput"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, required=True, help="working folder (data, runs, report)")
        if name == "prepare":
            continue
        p.add_argument("--steps", type=int, default=300 if name == "sweep" else 200)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--parallel", type=int, default=12 if name == "sweep" else 8)
        p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS if name == "sweep" else (128, 256, 512)))
        p.add_argument("--lr-exponents", type=int, nargs="+",
                       default=list(LR_EXPONENTS if name == "sweep" else (-10, -9, -8)))
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
        if name == "sweep":
            p.add_argument("--name", default="mutransfer", help="the sweep's name (its runs go to <work>/runs/NAME)")
            p.add_argument("--parametrisation", choices=sorted(PARAMETRISATIONS), default="both")
            p.add_argument("--grid", type=grid_entry, action="append", default=[], metavar="FIELD=V1,V2",
                           help="one more swept field, e.g. model.output_alpha=0.25,4 (repeatable)")
    args = parser.parse_args()
    {"prepare": prepare, "sweep": sweep, "throughput": throughput}[args.step](args)


if __name__ == "__main__":
    main()
