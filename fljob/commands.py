"""The commands that act: submit, status, logs, cancel, train, doctor.

Kept apart from cli.py so that `fljob validate/render/schema` never import submitit, torch or
the backends' I/O code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from fljob.backends.base import Handle
from fljob.spec import load_spec

BACKEND_MODULES = {"slurm": "fljob.backends.slurm", "k8s": "fljob.backends.kubernetes", "local": "fljob.backends.local"}


def backend(name: str) -> ModuleType:
    return importlib.import_module(BACKEND_MODULES[name])


def run(args: argparse.Namespace) -> int:
    if args.command == "submit":
        spec = load_spec(args.spec, args.overrides, args.site)
        handle = backend(args.backend).submit(
            spec, task="doctor" if args.doctor else "train", dry_run=args.dry_run
        )
        if handle is not None:
            print(handle)
        return 0
    if args.command in ("status", "logs", "cancel"):
        handle = Handle.parse(args.handle)
        mod = backend(handle.backend)
        if args.command == "status":
            print(mod.status(handle))
        elif args.command == "logs":
            for chunk in mod.logs(handle, follow=args.follow):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            mod.cancel(handle)
            print(f"{handle}: cancel requested")
        return 0
    if args.command == "train":
        from fljob.trainer.train import main as train

        return train(load_spec(args.spec, args.overrides))
    if args.command == "doctor":
        if args.distributed:
            from fljob.trainer.doctor_distributed import main as doctor_distributed

            return doctor_distributed()
        from fljob.doctor import main as doctor

        spec = load_spec(args.spec, args.overrides, args.site) if args.spec else None
        if spec is not None:  # what `submit` would reject is a bad spec (exit 2), not a failed check
            from fljob.cli import _renderer

            _renderer(args.backend).check(spec)
        return doctor(spec, args.backend)
    raise AssertionError(f"unhandled command {args.command}")
