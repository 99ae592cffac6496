"""The commands that act: submit, status, logs, cancel, train, doctor.

Kept apart from cli.py so that `fljob validate/render/schema` never import submitit, torch or
the backends' I/O code; this module never imports cli.py (the parser lives there).
"""

from __future__ import annotations

import argparse
import json
import sys

from fljob import backends
from fljob.backends.base import Handle
from fljob.spec import load_spec


def submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides, args.site)
    backend = backends.get(args.backend)
    plan = backend.plan(spec, task="doctor" if args.doctor else "train")
    if args.dry_run:
        print(plan.describe())
        return 0
    print(backend.submit(plan))
    return 0


def status(args: argparse.Namespace) -> int:
    handle = Handle.parse(args.handle)
    found = backends.for_handle(handle).status(handle)
    print(json.dumps(found.to_json(), indent=1) if args.json else found.line())
    return 0


def logs(args: argparse.Namespace) -> int:
    handle = Handle.parse(args.handle)
    for chunk in backends.for_handle(handle).logs(handle, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cancel(args: argparse.Namespace) -> int:
    handle = Handle.parse(args.handle)
    backends.for_handle(handle).cancel(handle)
    print(f"{handle}: cancel requested")
    return 0


def train(args: argparse.Namespace) -> int:
    from fljob.trainer.train import main as train_main

    return train_main(load_spec(args.spec, args.overrides))


def doctor(args: argparse.Namespace) -> int:
    if args.distributed:
        from fljob.trainer.doctor_distributed import main as doctor_distributed

        return doctor_distributed()
    from fljob.doctor import main as doctor_main

    spec = load_spec(args.spec, args.overrides, args.site) if args.spec else None
    if spec is not None:  # what `submit` would reject is a bad spec (exit 2), not a failed check
        backends.get(args.backend).check(spec)
    return doctor_main(spec, args.backend)


COMMANDS = {"submit": submit, "status": status, "logs": logs, "cancel": cancel, "train": train,
            "doctor": doctor}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)
