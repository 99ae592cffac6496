"""Render a job spec into the exact sbatch script (and the spec file beside it).

The script follows the rules in DESIGN.md and the launcher anchors: one task per node, the
c10d rendezvous on the first node's address computed on the batch host, ``fljob launch``
(torchrun that keeps the trainer's exit code) under ``srun --kill-on-bad-exit``, the pre-kill
signal trapped and forwarded to the step, and a trailer that requeues only for the trainer's
requeue exit code while the restart budget lasts. Every value from the spec is shell-quoted.
"""

from __future__ import annotations

import json
import shlex

from fljob.backends.base import (
    GENERATED_BY,
    SPEC_FILE,
    TASK_ARGV,
    RenderedFile,
    Task,
    check_job_or_sweep,
)
from fljob.backends.shell import env_block, forward_and_wait, secret_problems
from fljob.exitcodes import REQUEUE
from fljob.spec import JobSpec, Problem, dump_spec, problem_at
from fljob.spec.models import SLURM_WORD
from fljob.spec.sweep import SWEEP_INDEX_FILE, Trial, expand, sweep_index

SCRIPT_FILE = "job.sbatch"
LOG_PATTERN = "slurm-%j.out"
ARRAY_LOG_PATTERN = "slurm-%A_%a.out"
TRIALS_FILE = "trials.tsv"
# Array tasks of one sweep may share a node: each offsets the rendezvous port by its task id.
ARRAY_PORT_SPAN = 1000


def job_problems(spec: JobSpec) -> list[Problem]:
    """SLURM-specific requirements a generic spec does not carry."""
    problems = []
    container = spec.slurm.container
    if container.runtime != "none" and not (container.image or spec.image):
        problems.append(problem_at(spec, "slurm.container.image",
                                   f"runtime {container.runtime!r} needs an image: set image or slurm.container.image."))
    if not SLURM_WORD.match(spec.resolved_run_dir):
        problems.append(problem_at(spec, "run_dir",
                                   f"{spec.resolved_run_dir!r} goes into #SBATCH --output, which takes one plain "
                                   "word: use a path without spaces or quotes."))
    problems += secret_problems(spec, "SLURM")
    return problems


def check(spec: JobSpec) -> None:
    check_job_or_sweep(spec, job_problems)
    if spec.sweep is not None and spec.slurm.rdzv_port + ARRAY_PORT_SPAN > 65536:
        from fljob.spec import SpecError

        raise SpecError(spec.origin(), [problem_at(
            spec, "slurm.rdzv_port", f"a sweep's array tasks use ports rdzv_port .. rdzv_port+{ARRAY_PORT_SPAN - 1}; "
            f"set it at most {65536 - ARRAY_PORT_SPAN}.")])


def directives(spec: JobSpec, array: str | None = None) -> list[str]:
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
    if array:
        opts.append(("array", array))
    opts += [
        ("signal", f"B:{s.signal}@{s.grace_seconds}"),
        ("requeue", None),
        ("open-mode", "append"),
        ("output", f"{spec.resolved_run_dir}/{ARRAY_LOG_PATTERN if array else LOG_PATTERN}"),
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


def pick_trial(sweep_dir: str) -> str:
    """How an array task finds its trial: the line of trials.tsv whose first field is its task
    id. The values are only read into variables, never evaluated (and the spec checked them:
    DNS-1035 names, one-word run folders). ``sweep_dir`` is the quoted sweep folder."""
    return f"""\
# This array task's trial: its name and run folder, from {TRIALS_FILE} beside this script.
FLJOB_SWEEP_DIR="$(realpath -m -- {sweep_dir})"
IFS="$(printf '\\t')" read -r trial_index trial_name trial_dir <<EOF_TRIAL
$(awk -F '\\t' -v i="$SLURM_ARRAY_TASK_ID" '$1 == i {{ print; exit }}' "$FLJOB_SWEEP_DIR/{TRIALS_FILE}")
EOF_TRIAL
if [ "${{trial_index:-}}" != "$SLURM_ARRAY_TASK_ID" ]; then
  echo "fljob: no trial $SLURM_ARRAY_TASK_ID in $FLJOB_SWEEP_DIR/{TRIALS_FILE}: render the sweep again" >&2
  exit 2
fi
"""


def render_script(spec: JobSpec, task: Task = "train", trials: list[Trial] | None = None) -> str:
    """The batch script; with ``trials``, one array job whose task i runs trial i."""
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
    step = f"{' '.join(srun)} \\\n  {' '.join(prefix) + ' ' if prefix else ''}{' '.join(launch)}"
    if trials:
        pick = pick_trial(shlex.quote(spec.resolved_run_dir)) + "\n"
        env = env_block(spec, "slurm", run_id='"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
                        run_dir='"$trial_dir"', job_name='"$trial_name"')
        port = f"$(({s.rdzv_port} + SLURM_ARRAY_TASK_ID % {ARRAY_PORT_SPAN}))"
        started = "trial $SLURM_ARRAY_TASK_ID ($FLJOB_JOB_NAME) as job $SLURM_JOB_ID"
    else:
        pick, env = "", env_block(spec, "slurm", run_id='"$SLURM_JOB_ID"')
        port, started = str(s.rdzv_port), "job $SLURM_JOB_ID"
    body = f"""
set -uo pipefail  # no -e: the trailer must see the step's exit code

{pick}{env}

# Rendezvous on the first node of the allocation, resolved here on the batch host
# (scontrol may be missing inside a container).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT={port}
export MASTER_ADDR MASTER_PORT

echo "fljob: {started} restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# SLURM sends SIG{s.signal} to this shell {s.grace_seconds}s before the time limit (or on preemption).
# Forward it to the step: the trainer checkpoints and exits {REQUEUE}; the trailer requeues.
{forward_and_wait(s.signal, step, "the training step")}

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
    array = f"0-{len(trials) - 1}%{min(spec.sweep.parallel, len(trials))}" if trials and spec.sweep else None
    header = "\n".join(["#!/bin/bash", *directives(spec, array), f"# {GENERATED_BY}"])
    return header + "\n" + body


def trials_table(trials: list[Trial]) -> str:
    """trials.tsv: index, name and run folder of each trial, tab-separated, one per line."""
    return "".join(f"{t.index}\t{t.name}\t{t.run_dir}\n" for t in trials)


def render(spec: JobSpec, task: Task = "train") -> list[RenderedFile]:
    """job.sbatch and spec.yaml; a sweep: one array job, trials.tsv, sweep.json and each trial's
    spec.yaml in its own folder."""
    check(spec)
    if spec.sweep is None:
        return [RenderedFile(SCRIPT_FILE, render_script(spec, task), executable=True),
                RenderedFile(SPEC_FILE, dump_spec(spec))]
    trials = expand(spec)
    return [RenderedFile(SCRIPT_FILE, render_script(spec, task, trials), executable=True),
            RenderedFile(TRIALS_FILE, trials_table(trials)),
            RenderedFile(SWEEP_INDEX_FILE, json.dumps(sweep_index(spec, trials), indent=1) + "\n"),
            *(RenderedFile(f"{t.name}/{SPEC_FILE}", dump_spec(t.spec)) for t in trials)]
