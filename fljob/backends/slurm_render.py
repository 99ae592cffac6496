"""Render a job spec into the exact sbatch script (and the spec file beside it).

The script follows the rules in DESIGN.md and the launcher anchors: one task per node, the
c10d rendezvous on the first node's address computed on the batch host, ``fljob launch``
(torchrun that keeps the trainer's exit code) under ``srun --kill-on-bad-exit``, the pre-kill
signal trapped and forwarded to the step, and a trailer that requeues only for the trainer's
requeue exit code while the restart budget lasts. Every value from the spec is shell-quoted.
"""

from __future__ import annotations

import shlex

from fljob.backends.base import GENERATED_BY, SPEC_FILE, TASK_ARGV, RenderedFile, Task
from fljob.backends.shell import env_block, secret_problems
from fljob.exitcodes import REQUEUE
from fljob.spec import JobSpec, SpecError, dump_spec, problem_at
from fljob.spec.models import SLURM_WORD

SCRIPT_FILE = "job.sbatch"
LOG_PATTERN = "slurm-%j.out"


def check(spec: JobSpec) -> None:
    """SLURM-specific requirements a generic spec does not carry."""
    problems = []
    container = spec.slurm.container
    if container.runtime != "none" and not (container.image or spec.image):
        problems.append(problem_at(spec, "slurm.container.image",
                                f"runtime {container.runtime!r} needs an image: set image or slurm.container.image."))
    if not SLURM_WORD.match(spec.resolved_run_dir):
        problems.append(problem_at(spec, "run_dir",
                                f"{spec.resolved_run_dir!r} goes into #SBATCH --output, which takes one plain word: "
                                "use a path without spaces or quotes."))
    problems += secret_problems(spec, 'SLURM')
    if problems:
        raise SpecError(spec.origin(), problems)


def directives(spec: JobSpec) -> list[str]:
    """The #SBATCH lines, in a fixed order (values are single words, checked by the spec)."""
    s, r = spec.slurm, spec.resources
    opts: list[tuple[str, str | None]] = [
        ("job-name", spec.name),
        ("nodes", str(r.nodes)),
        ("ntasks-per-node", "1"),
    ]
    if r.cpus_per_node:
        opts.append(("cpus-per-task", str(r.cpus_per_node)))
    if r.gpus_per_node:
        opts.append(("gpus-per-node", str(r.gpus_per_node)) if s.gpu_directive == "gpus-per-node"
                    else ("gres", f"gpu:{r.gpus_per_node}"))
    if r.memory_gib:
        opts.append(("mem", f"{r.memory_gib}G"))
    opts.append(("time", s.time))
    opts += [(k, v) for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                                 ("constraint", s.constraint)) if v]
    if s.exclusive:
        opts.append(("exclusive", None))
    opts += [
        ("signal", f"B:{s.signal}@{s.grace_seconds}"),
        ("requeue", None),
        ("open-mode", "append"),
        ("output", f"{spec.resolved_run_dir}/{LOG_PATTERN}"),
    ]
    opts += sorted(s.extra_sbatch.items())
    return [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}" for k, v in opts]


def _container_prefix(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(srun options, command prefix) that put the step inside the container, if any.

    The run folder is always mounted at the same path so the spec and logs resolve inside.
    """
    c = spec.slurm.container
    image = c.image or spec.image or ""
    run_dir_mount = '"$FLJOB_RUN_DIR:$FLJOB_RUN_DIR"'
    if c.runtime == "pyxis":
        mounts = ",".join(c.mounts)
        opts = [f"--container-image={shlex.quote(image)}",
                f"--container-mounts={run_dir_mount}" + (f",{shlex.quote(mounts)}" if mounts else ""),
                "--no-container-mount-home"]
        if c.workdir:
            opts.append(f"--container-workdir={shlex.quote(c.workdir)}")
        return opts, []
    if c.runtime == "apptainer":
        prefix = ["apptainer", "exec"]
        if spec.resources.gpus_per_node:
            prefix.append("--nv")
        prefix += ["--bind", run_dir_mount]
        for m in c.mounts:
            prefix += ["--bind", shlex.quote(m)]
        if c.workdir:
            prefix += ["--pwd", shlex.quote(c.workdir)]
        prefix.append(shlex.quote(image))
        return [], prefix
    return [], []


def render_script(spec: JobSpec, task: Task = "train") -> str:
    s = spec.slurm
    srun_opts, prefix = _container_prefix(spec)
    launch = [
        "fljob", "launch",
        '--nnodes="$SLURM_NNODES"',
        f"--nproc-per-node={spec.resources.nproc_per_node}",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
        "--",
        *TASK_ARGV[task],
        '"$FLJOB_SPEC"',
    ]
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--wait={s.wait_seconds}", *srun_opts]
    body = f"""
set -uo pipefail  # no -e: the trailer must see the step's exit code

{env_block(spec, "slurm", run_id='"$SLURM_JOB_ID"')}

# Rendezvous on the first node of the allocation, resolved here on the batch host
# (scontrol may be missing inside a container).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT={s.rdzv_port}
export MASTER_ADDR MASTER_PORT

# SLURM sends SIG{s.signal} to this shell {s.grace_seconds}s before the time limit (or on preemption).
# Forward it to the step: the trainer checkpoints and exits {REQUEUE}; the trailer requeues.
step_pid=""
signalled=0
forward_signal() {{
  signalled=1
  echo "fljob: SIG{s.signal} received; forwarding to the training step" >&2
  [ -n "$step_pid" ] && kill -{s.signal} "$step_pid" 2>/dev/null
}}
trap forward_signal {s.signal}

echo "fljob: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
{" ".join(srun)} \\
  {" ".join(prefix) + " " if prefix else ""}{" ".join(launch)} &
step_pid=$!
while :; do  # wait again after each trapped signal, until the step really ends
  signalled=0
  wait "$step_pid"
  rc=$?
  [ "$signalled" = 1 ] || break
done

if [ "$rc" -eq {REQUEUE} ]; then
  restarts="${{SLURM_RESTART_COUNT:-0}}"
  if [ "$restarts" -lt {s.max_restarts} ]; then
    echo "fljob: the trainer checkpointed and asked to be requeued; requeue $((restarts + 1)) of {s.max_restarts}" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "fljob: requeue budget of {s.max_restarts} spent; not requeueing" >&2
fi
echo "fljob: step finished with exit code $rc"
exit "$rc"
"""
    header = "\n".join(["#!/bin/bash", *directives(spec), f"# {GENERATED_BY}"])
    return header + "\n" + body


def render(spec: JobSpec, task: Task = "train") -> list[RenderedFile]:
    check(spec)
    return [RenderedFile(SCRIPT_FILE, render_script(spec, task), executable=True),
            RenderedFile(SPEC_FILE, dump_spec(spec))]
