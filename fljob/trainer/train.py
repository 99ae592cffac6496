"""``fljob train spec.yaml``: the container entrypoint, run by every worker process.

Order matters: the device is chosen before torchtitan is imported (it fixes its device at
import), the preemption handlers are installed before the slow start-up, and the data is
prepared before the trainer is built (the tokenizer's vocabulary sizes the model). Runs
under ``fljob launch``/torchrun, or alone as a single process.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings

from fljob.exitcodes import DIVERGED, OK, REQUEUE
from fljob.spec.models import JobSpec


def main(spec: JobSpec) -> int:
    """Train ``spec``; OK when done, REQUEUE when stopped early by a preemption signal,
    DIVERGED when stopped on a non-finite loss or gradient norm."""
    from fljob.trainer.device import resolve_device, set_cpu_threads, use_device
    from fljob.trainer.preemption import Preemption

    preemption = Preemption()
    _single_process_defaults()
    device = resolve_device(spec.training.device)
    use_device(device)  # before anything below imports torchtitan
    if device == "cpu":
        set_cpu_threads()
    # torchtitan opens autocast even for float32 "mixed" precision; torch then warns once
    # that the dtype is unsupported and runs without it, which is what float32 means.
    warnings.filterwarnings("ignore", message=r"In \w+ autocast, but the target dtype is not supported")
    _configure_logging(rank=int(os.environ["RANK"]))

    from fljob.storage import apply_storage_environment
    from fljob.trainer import train_spec
    from fljob.trainer.data.builder import build_tokenizer
    from fljob.trainer.data.prepare import prepare_bundled_text, prepare_stream_tokenizer
    from fljob.trainer.divergence import Diverged
    from fljob.trainer.job_config import build_job_config
    from fljob.trainer.model.flavors import flavor_name, get_flavor
    from fljob.trainer.process_group import end_process_group
    from fljob.trainer.trainer import FljobTrainer

    apply_storage_environment(spec.storage)  # endpoint, region, resolved credentials
    if spec.data.streams:
        prepare_stream_tokenizer(spec)
    else:
        prepare_bundled_text(spec, vocab_size=get_flavor(flavor_name(spec)).vocab_size)
    train_spec.register(spec, vocab_size=build_tokenizer(spec).get_vocab_size())

    trainer = FljobTrainer(build_job_config(spec, device), preemption)
    ended = "failed"
    try:
        try:
            trainer.train()
            if trainer.preempted:
                trainer.save_for_requeue()
        except Diverged:  # every rank, at the same step; the trainer logged why
            ended = "diverged"
        except BaseException:
            trainer.write_summary("failed")
            raise
        else:
            ended = "preempted" if trainer.preempted else "completed"
        trainer.finish(ended)
    finally:
        trainer.close()
        end_process_group(all_ranks_here=ended != "failed")
    return {"diverged": DIVERGED, "preempted": REQUEUE}.get(ended, OK)


def _single_process_defaults() -> None:
    """Let a bare ``fljob train`` (no torchrun) form a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class _DropTorchtitanStepLine(logging.Filter):
    """torchtitan logs its own line per step; fljob's progress line on stdout replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "log"
                    and record.pathname.endswith(os.path.join("components", "metrics.py")))


def _configure_logging(rank: int) -> None:
    """torchtitan logs through the root logger: to stderr, rank 0 at INFO, others WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_DropTorchtitanStepLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
