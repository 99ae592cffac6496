"""The rendered sbatch script, run by real bash.

`srun` and `scontrol` are replaced by small recording scripts on PATH (the real SLURM tests
are in tests/integration/): this proves what the batch script itself does — which values it
exports, the exact step command line, the signal forwarding and the requeue trailer — for
arbitrary spec values, including ones crafted to inject commands.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fljob.backends import local, slurm_render
from fljob.exitcodes import REQUEUE
from fljob.spec import load_spec, load_spec_text
from fljob.spec.models import SECRET_LIKE_ENV

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"

FAKE_SRUN = r"""#!/bin/bash
# Records the step's argv (NUL-separated) and environment, then behaves as told.
printf '%s\0' "$@" > "$FAKE_OUT/srun.argv"
python3 -c 'import json, os; print(json.dumps(dict(os.environ)))' > "$FAKE_OUT/srun.env"
if [ -n "${FAKE_SRUN_WAIT_SIGNAL:-}" ]; then
  trap 'echo got-usr2 >> "$FAKE_OUT/signals"; exit "$FAKE_SRUN_RC"' USR2
  touch "$FAKE_OUT/srun.ready"
  for _ in $(seq 300); do sleep 0.1; done
  exit 99
fi
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'node-a\nnode-b\n' ;;
  "requeue "*) echo "$2" >> "$FAKE_OUT/requeued" ;;
  *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_batch_script(script: Path, bin_dir: Path, workdir: Path, extra_env: dict[str, str] | None = None,
                     wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_OUT": str(bin_dir),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        **(extra_env or {}),
    }
    if wait:
        return subprocess.run(["bash", str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=60, check=False)
    return subprocess.Popen(["bash", str(script)], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def write_rendered(spec, folder: Path) -> Path:
    for f in slurm_render.render(spec):
        f.write(folder / spec.resolved_run_dir)
    return folder / spec.resolved_run_dir / slurm_render.SCRIPT_FILE


# --------------------------------------------------------------------------- quoting property

MARKER = "INJECTED"
nasty_text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40),
    st.sampled_from([f"$(touch {MARKER})", f"`touch {MARKER}`", f"'; touch {MARKER}; '", f"\"; touch {MARKER}; \"",
                     f"a\ntouch {MARKER}\n", "${HOME}", "$SLURM_JOB_ID", "*", "\\", "-rf", "%j", "--", "'\"'"]),
)
env_names = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,15}\Z").filter(
    lambda n: not SECRET_LIKE_ENV.search(n) and not n.startswith(("FLJOB_", "SLURM_", "FAKE_"))
    and n not in ("PATH", "PYTHONUNBUFFERED", "MASTER_ADDR", "MASTER_PORT", "PWD", "SHLVL", "_", "OLDPWD",
                  "LC_CTYPE", "LANG", "HOME", "IFS", "PS4", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "CDPATH",
                  "GLOBIGNORE", "POSIXLY_CORRECT", "BASH_XTRACEFD", "PROMPT_COMMAND", "TMOUT", "LD_PRELOAD"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=st.dictionaries(env_names, nasty_text, max_size=4), image=nasty_text, workdir=nasty_text,
       runtime=st.sampled_from(["none", "pyxis", "apptainer"]))
def test_script_exports_exactly_the_spec_values_and_runs_nothing_else(tmp_path_factory, env, image, workdir, runtime):
    tmp = tmp_path_factory.mktemp("q")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    container = {"runtime": runtime, "image": image or "img", "workdir": workdir or None}
    spec = load_spec_text("name: quoting\nrun_dir: run\n")
    spec = spec.model_validate({**spec.model_dump(), "env": env, "slurm": {"container": container}})
    script = write_rendered(spec, tmp)
    result = run_batch_script(script, bin_dir, tmp)
    assert result.returncode == 0, result.stderr
    assert not list(tmp.rglob(MARKER)) and not (Path.cwd() / MARKER).exists()
    seen_env = json.loads((bin_dir / "srun.env").read_text())
    for key, value in env.items():
        assert seen_env[key] == value
    argv = (bin_dir / "srun.argv").read_bytes().decode().split("\0")[:-1]
    run_dir = str((tmp / "run").resolve())
    launch_at = argv.index("fljob")
    assert argv[launch_at:] == ["fljob", "launch", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                "--rdzv-endpoint=node-a:29500", "--rdzv-id=4242", "--", "train",
                                f"{run_dir}/spec.yaml"]
    head = argv[:launch_at]
    assert head[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--wait=60"]
    if runtime == "pyxis":
        assert f"--container-image={image or 'img'}" in head
        assert f"--container-mounts={run_dir}:{run_dir}" in head
        assert (f"--container-workdir={workdir}" in head) == bool(workdir)
    elif runtime == "apptainer":
        assert head[3:6] == ["apptainer", "exec", "--bind"] and head[-1] == (image or "img")
        if workdir:
            assert head[head.index("--pwd") + 1] == workdir
    else:
        assert len(head) == 3


def test_secret_references_resolve_at_run_time_and_never_render(fake_slurm: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text("planted-secret-from-file")
    spec = load_spec_text(
        "name: secrets\nrun_dir: run\nstorage:\n  access_key_id: {env: MY_KEY_VAR}\n"
        f"  secret_access_key: {{file: {secret_file}}}\nsecret_env:\n  HF_TOKEN: {{env: HF_TOKEN}}\n")
    script = write_rendered(spec, tmp_path)
    rendered = "".join(p.read_text() for p in script.parent.iterdir() if p.is_file())
    for planted in ("planted-key-from-env", "planted-secret-from-file", "planted-hf-token"):
        assert planted not in rendered
    result = run_batch_script(script, fake_slurm, tmp_path,
                              {"MY_KEY_VAR": "planted-key-from-env", "HF_TOKEN": "planted-hf-token"})
    assert result.returncode == 0, result.stderr
    seen = json.loads((fake_slurm / "srun.env").read_text())
    assert seen["AWS_ACCESS_KEY_ID"] == "planted-key-from-env"
    assert seen["AWS_SECRET_ACCESS_KEY"] == "planted-secret-from-file"
    assert seen["HF_TOKEN"] == "planted-hf-token"
    assert "planted" not in result.stdout + result.stderr
    missing = run_batch_script(script, fake_slurm, tmp_path, {"HF_TOKEN": "x"})
    assert missing.returncode != 0 and "MY_KEY_VAR is not set" in missing.stderr


# --------------------------------------------------------------------------- preemption contract


@pytest.mark.parametrize(("restart_count", "requeued"), [(None, True), ("2", True), ("3", False)])
def test_trailer_requeues_only_for_requeue_code_within_budget(fake_slurm, tmp_path, restart_count, requeued):
    spec = load_spec_text("name: pre\nrun_dir: run\nslurm: {max_restarts: 3}\n")
    script = write_rendered(spec, tmp_path)
    env = {"FAKE_SRUN_RC": str(REQUEUE)}
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = restart_count
    result = run_batch_script(script, fake_slurm, tmp_path, env)
    assert (fake_slurm / "requeued").exists() == requeued, result.stderr
    if requeued:
        assert (fake_slurm / "requeued").read_text().split() == ["4242"] and result.returncode == 0
    else:
        assert "budget of 3 spent" in result.stderr and result.returncode == REQUEUE


@pytest.mark.parametrize("rc", [0, 1, 137])
def test_trailer_never_requeues_other_exit_codes(fake_slurm, tmp_path, rc):
    script = write_rendered(load_spec_text("name: pre\nrun_dir: run\n"), tmp_path)
    result = run_batch_script(script, fake_slurm, tmp_path, {"FAKE_SRUN_RC": str(rc)})
    assert not (fake_slurm / "requeued").exists()
    assert result.returncode == rc


def test_presignal_is_forwarded_to_the_step_and_its_exit_code_kept(fake_slurm, tmp_path):
    script = write_rendered(load_spec_text("name: pre\nrun_dir: run\n"), tmp_path)
    proc = run_batch_script(script, fake_slurm, tmp_path,
                            {"FAKE_SRUN_WAIT_SIGNAL": "1", "FAKE_SRUN_RC": str(REQUEUE)}, wait=False)
    deadline = time.time() + 20
    while not (fake_slurm / "srun.ready").exists():
        assert time.time() < deadline and proc.poll() is None, "the fake step never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # what SLURM does with --signal=B:USR2@grace
    _, stderr = proc.communicate(timeout=30)
    assert (fake_slurm / "signals").read_text().split() == ["got-usr2"]
    assert "SIGUSR2 received; forwarding" in stderr
    assert (fake_slurm / "requeued").read_text().split() == ["4242"]  # the step's 75 survived the trap
    assert proc.returncode == 0


# --------------------------------------------------------------------------- directives and golden files


def test_directives() -> None:
    spec = load_spec(REPO / "configs" / "slurm-pyxis.yaml")
    lines = slurm_render.directives(spec)
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --signal=B:USR2@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                     "#SBATCH --time=1-00:00:00", "#SBATCH --exclusive"):
        assert expected in lines
    gres = load_spec(REPO / "configs" / "slurm-apptainer.yaml")
    assert "#SBATCH --gres=gpu:4" in slurm_render.directives(gres)


def test_run_dir_must_be_one_word_for_sbatch() -> None:
    from fljob.spec import SpecError

    with pytest.raises(SpecError, match="run_dir"):
        slurm_render.check(load_spec_text("name: a\nrun_dir: 'my runs/x'\n"))


GOLDEN_CASES = [
    ("slurm", "slurm-pyxis.yaml", slurm_render, "train"),
    ("slurm", "slurm-apptainer.yaml", slurm_render, "train"),
    ("slurm", "local.yaml", slurm_render, "doctor"),
    ("local", "local.yaml", local, "train"),
]


@pytest.mark.parametrize(("kind", "config", "module", "task"), GOLDEN_CASES,
                         ids=[f"{k}-{c}-{t}" for k, c, _, t in GOLDEN_CASES])
def test_golden(kind, config, module, task) -> None:
    spec = load_spec(REPO / "configs" / config)
    rendered = "".join(f"# ==== {f.name}\n{f.content}" for f in module.render(spec, task))
    assert rendered == "".join(f"# ==== {f.name}\n{f.content}" for f in module.render(spec, task))  # stable
    golden = GOLDEN / kind / f"{Path(config).stem}.{task}.txt"
    if os.environ.get("FLJOB_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    expected = golden.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), rendered.splitlines(True), str(golden), "rendered"))
    assert not diff, f"render changed; if intended, rerun with FLJOB_UPDATE_GOLDEN=1:\n{diff}"
