"""Shell fragments shared by the batch script (SLURM) and the run script (local backend).

Every value that comes from the spec is quoted with shlex.quote, and secrets are resolved at
run time from their references: no value in the spec can change what runs, and no credential
is ever written into a rendered file.
"""

from __future__ import annotations

import shlex

from fljob.backends.base import SPEC_FILE, secret_field, secret_refs
from fljob.spec import JobSpec, Problem, problem_at


def secret_problems(spec: JobSpec, backend: str) -> list[Problem]:
    """Shell backends resolve `env` and `file` references; a k8s_secret alone is not enough."""
    return [
        problem_at(spec, secret_field(spec, target),
                f"has only a k8s_secret reference; {backend} needs env (a variable of the submitting "
                "environment) or file (a path readable on the nodes).")
        for target, ref in secret_refs(spec).items()
        if ref.env is None and ref.file is None
    ]


REQUIRE_ENV = (
    'require_env() { [ -n "${!1+x}" ] || { echo "fljob: $1 is not set in the submitting environment" >&2; exit 2; }; }'
)


def secret_exports(spec: JobSpec) -> list[str]:
    """Lines that resolve secret references at run time; no value is ever rendered."""
    refs = sorted(secret_refs(spec).items())
    lines = [REQUIRE_ENV] if any(ref.file is None for _, ref in refs) else []
    for target, ref in refs:
        if ref.file:
            lines += [f'{target}="$(cat -- {shlex.quote(ref.file)})" || exit 2', f"export {target}"]
        else:
            lines.append(f"require_env {ref.env}")
            if ref.env != target:
                lines.append(f'export {target}="${ref.env}"')
    return lines


def env_block(spec: JobSpec, backend: str, run_id: str, run_dir: str | None = None,
              job_name: str | None = None) -> str:
    """The run folder, the spec path, fljob's own variables, the spec's env and secrets.

    `run_id`, `run_dir` and `job_name` are shell expressions (already quoted as needed)
    evaluated at run time; the last two default to the spec's own, quoted.
    """
    run_dir = run_dir or shlex.quote(spec.resolved_run_dir)
    lines = [
        "# Values from the spec, quoted: none of them can change what runs.",
        f'FLJOB_RUN_DIR="$(realpath -m -- {run_dir})"',
        "export FLJOB_RUN_DIR",
        f'export FLJOB_SPEC="$FLJOB_RUN_DIR/{SPEC_FILE}"',
        f"export FLJOB_JOB_NAME={job_name or shlex.quote(spec.name)}",
        f"export FLJOB_RUN_ID={run_id}",
        f"export FLJOB_BACKEND={backend}",
        "export PYTHONUNBUFFERED=1",
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())),
        *secret_exports(spec),
        'if [ ! -f "$FLJOB_SPEC" ]; then',
        '  echo "fljob: $FLJOB_SPEC is missing: submit with \'fljob submit\', or render with -o into the run_dir" >&2',
        "  exit 2",
        "fi",
    ]
    return "\n".join(lines)


def forward_and_wait(signal: str, command: str, what: str) -> str:
    """Start `command` in the background, forward SIG`signal` to it, and wait until it really
    ends (a trapped signal interrupts `wait`); leaves its exit code in $rc. POSIX sh.

    A shell running a job in the foreground would not run its trap until the job ends, and a
    shell as PID 1 (a container) drops SIGTERM; so the job runs in the background and the
    shell waits again after each signal it forwards.
    """
    return f"""\
child=""
signalled=0
forward_signal() {{
  signalled=1
  echo "fljob: SIG{signal} received; forwarding to {what}" >&2
  [ -n "$child" ] && kill -{signal} "$child" 2>/dev/null
}}
trap forward_signal {signal}
{command} &
child=$!
while :; do  # wait again after each trapped signal, until the child really ends
  signalled=0
  wait "$child"
  rc=$?
  [ "$signalled" = 1 ] || break
done"""
