"""How long `fljob validate` and `fljob render` take to start and answer, beside `python -c pass`.

The CLI core must answer in well under 0.3 s: nothing on that path may import torch. Each
command runs N times in a fresh interpreter; we report the median wall time and its ratio to
the interpreter's own start-up (the anchor, measured in the same run).

    python bench/startup.py [--repeat 15]    # writes bench/results/startup.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLURM_SPEC = REPO / "configs" / "slurm-pyxis.yaml"
K8S_SPEC = REPO / "configs" / "kubernetes.yaml"


def median_seconds(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.md")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as out:
        cases = {
            "python -c pass (anchor)": [py, "-c", "pass"],
            "fljob validate": [py, "-m", "fljob.cli", "validate", str(SLURM_SPEC)],
            "fljob render --backend slurm": [py, "-m", "fljob.cli", "render", "-b", "slurm", str(SLURM_SPEC), "-o", out],
            "fljob render --backend k8s": [py, "-m", "fljob.cli", "render", "-b", "k8s", str(K8S_SPEC), "-o", out],
        }
        results = {name: median_seconds(argv, args.repeat) for name, argv in cases.items()}
    torch_free = subprocess.run(
        [py, "-c", ("import sys, fljob.cli, fljob.backends.slurm_render, fljob.backends.kubernetes_render; "
                    "print('torch' in sys.modules)")], capture_output=True, text=True, cwd=REPO,
        check=True).stdout.strip()
    anchor = results["python -c pass (anchor)"]
    lines = [
        "# CLI start-up: `fljob validate` / `fljob render`",
        "",
        f"- machine: {platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'}), Python {platform.python_version()}",
        f"- command: `python bench/startup.py --repeat {args.repeat}` (median of {args.repeat} fresh processes)",
        f"- torch imported by the CLI core: {torch_free}",
        "- target: under 0.3 s",
        "",
        "| command | median s | x anchor | under 0.3 s |",
        "|---|---|---|---|",
    ]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / anchor:.1f} | {'yes' if seconds < 0.3 else 'NO'} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
