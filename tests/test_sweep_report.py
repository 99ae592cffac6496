"""`fljob sweep report` on sweep folders made of real summary.json files.

Each sweep is a real spec with a `sweep:` block, expanded by fljob.spec.sweep into validated
trials; every trial's summary is written with fljob.summary.write_summary as the trainer
writes it. Losses follow a U over log2(lr) whose bottom the test places: muP keeps it at
2^-9 at every width, SP moves it one grid step down per doubling of width.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fljob.cli import main
from fljob.spec import JobSpec, load_spec_text
from fljob.spec.sweep import SWEEP_INDEX_FILE, expand, sweep_index
from fljob.summary import RunSummary, write_summary

REPO = Path(__file__).resolve().parents[1]
LRS = [2.0 ** e for e in range(-12, -5)]  # 2^-12 .. 2^-6
WIDTHS = [128, 256, 512, 1024]
STEPS = 100
Outcome = tuple[str, float, float | None] | None  # (state, train loss, validation loss); None: no summary


def sp_optimum(width: int) -> int:
    """log2 of SP's best lr: 2^-7 at width 128, one step down per doubling."""
    return -7 - int(math.log2(width // 128))


def u_loss(spec: JobSpec) -> float:
    """A realistic final loss: lower for wider models, a parabola in log2(lr) around the optimum."""
    width, seed = spec.model.width, spec.training.seed
    optimum = -9 if spec.model.mup else sp_optimum(width)
    return 4.2 - 0.15 * math.log2(width / 128) + 0.04 * (math.log2(spec.optimizer.lr) - optimum) ** 2 + 0.003 * seed


def standard(spec: JobSpec) -> Outcome:
    """The main sweep's outcomes: U-shaped losses, some divergences at large lr, one huge loss."""
    e, width = round(math.log2(spec.optimizer.lr)), spec.model.width
    if not spec.model.mup and width == 1024 and e >= -7:
        return "diverged", math.nan, None
    if spec.model.mup and width == 1024 and e == -6 and spec.training.seed == 1:
        return "diverged", math.nan, math.nan
    if not spec.model.mup and width == 512 and e == -6:
        return "completed", 7.8, 7.9  # finite, far above the rest: clipped in the plot
    loss = u_loss(spec)
    return "completed", loss - 0.03, loss


def build_sweep(root: Path, outcome: Callable[[JobSpec], Outcome], *, name: str = "lrw",
                grid: dict[str, list[Any]] | None = None, validation: bool = True,
                checkpoint_uri: str | None = None, copy: bool = False) -> Path:
    """A sweep's run folder as `fljob submit` and the trainer leave it: sweep.json and one
    summary.json per trial (copied to the trial's checkpoint.uri when ``copy``)."""
    grid = grid or {"model.mup": [True, False], "model.width": WIDTHS, "optimizer.lr": LRS,
                    "training.seed": [0, 1]}
    data: dict[str, Any] = {"name": name, "run_dir": f"{root}/{{name}}", "model": {"flavor": "7.61M"},
                            "training": {"steps": STEPS, "validation_interval": 50 if validation else None},
                            "sweep": {"grid": grid, "parallel": 4}}
    if checkpoint_uri:
        data["checkpoint"] = {"uri": checkpoint_uri}
    spec = load_spec_text(yaml.safe_dump(data))
    trials = expand(spec)
    folder = Path(spec.resolved_run_dir)
    folder.mkdir(parents=True)
    (folder / SWEEP_INDEX_FILE).write_text(json.dumps(sweep_index(spec, trials), indent=1))
    for trial in trials:
        result = outcome(trial.spec)
        if result is None:
            continue
        state, train, validation_loss = result
        step = {"completed": STEPS, "running": 60, "diverged": 37}.get(state, 20)
        summary = RunSummary(
            name=trial.name, run_id=f"{trial.name}-r0", state=state, step=step, steps=STEPS,
            train_loss=train, validation_loss=validation_loss,
            validation_step=None if validation_loss is None else (step // 50) * 50 or None,
            diverged=state == "diverged", width=trial.spec.model.width, depth=4,
            trial=trial.spec.trial.model_dump(mode="json"), spec=trial.spec.model_dump(mode="json"))
        write_summary(trial.run_dir, summary, copy_to=trial.spec.checkpoint.uri if copy else None)
    return folder


def fljob(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fljob.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)


def strict_json(path: Path) -> Any:
    """JSON as the standard defines it: NaN/Infinity literals are errors."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds the invalid JSON literal {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["sweep", "report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def optima(data: dict[str, Any], label: str) -> dict[int, float | None]:
    group = next(g for g in data["groups"] if g["label"] == label)
    return {o["width"]: o["lr"] for o in group["optima"]}


@dataclass(frozen=True)
class Reported:
    folder: Path
    out: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def main_sweep(tmp_path_factory: pytest.TempPathFactory) -> Reported:
    """The full grid (muP and SP x 4 widths x 7 lrs x 2 seeds), reported by the CLI's main."""
    root = tmp_path_factory.mktemp("sweep")
    folder = build_sweep(root / "runs", standard)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", "report", str(folder), "-o", str(root / "report")])
    return Reported(folder, root / "report", code, out.getvalue(), err.getvalue())


def test_the_optimum_holds_under_mup_and_drifts_under_sp(main_sweep) -> None:
    done = main_sweep
    out = done.out
    assert done.returncode == 0 and not done.stderr, done.stderr
    data = strict_json(out / "report.json")
    assert [g["label"] for g in data["groups"]] == ["muP", "SP"]
    assert optima(data, "muP") == dict.fromkeys(WIDTHS, 2.0 ** -9)
    assert optima(data, "SP") == {w: 2.0 ** sp_optimum(w) for w in WIDTHS}
    verdicts = {g["label"]: g["verdict"] for g in data["groups"]}
    assert (verdicts["muP"]["steps"], verdicts["SP"]["steps"]) == (0, -3)
    assert "muP: optimum moved 0 grid steps from width 128 to 1024 (lr 2^-9 -> 2^-9)" in done.stdout
    assert "SP: optimum moved 3 grid steps down from width 128 to 1024 (lr 2^-7 -> 2^-10)" in done.stdout
    assert "width   128: lr 2^-9 (grid step 4 of 7), validation loss 4.2015 (±0.0015, 2 seeds)" in done.stdout
    assert data["metric"] == "validation_loss" and data["learning_rates"] == LRS
    assert data["widths"] == WIDTHS and data["seeds"] == [0, 1]
    mup_128 = next(o for g in data["groups"] if g["label"] == "muP" for o in g["optima"] if o["width"] == 128)
    assert mup_128["loss"] == pytest.approx(4.2015) and (mup_128["min"], mup_128["max"]) == pytest.approx((4.2, 4.203))


def test_report_json_lists_every_trial_with_its_outcome(main_sweep) -> None:
    folder, out = main_sweep.folder, main_sweep.out
    data = strict_json(out / "report.json")
    index = json.loads((folder / SWEEP_INDEX_FILE).read_text())
    assert data["sweep"] == "lrw" and data["counts"] == {
        "trials": 112, "completed": 107, "diverged": 5, "unfinished": 0, "failed": 0, "missing": 0}
    assert [(t["index"], t["name"], t["overrides"]) for t in data["trials"]] == [
        (t["index"], t["name"], t["overrides"]) for t in index["trials"]]
    first = data["trials"][0]
    assert first["overrides"] == {"model.mup": True, "model.width": 128, "optimizer.lr": 2.0 ** -12,
                                  "training.seed": 0}
    assert (first["state"], first["diverged"], first["validation_step"]) == ("completed", False, 100)
    assert first["validation_loss"] == pytest.approx(4.2 + 0.04 * 9)
    assert first["train_loss"] == pytest.approx(first["validation_loss"] - 0.03)
    diverged = [t for t in data["trials"] if t["diverged"]]
    assert {(t["mup"], t["width"], t["lr"], t["seed"]) for t in diverged} == {
        (False, 1024, 2.0 ** -7, 0), (False, 1024, 2.0 ** -7, 1), (False, 1024, 2.0 ** -6, 0),
        (False, 1024, 2.0 ** -6, 1), (True, 1024, 2.0 ** -6, 1)}
    assert all(t["state"] == "diverged" and t["train_loss"] == "nan" for t in diverged)
    assert {t["validation_loss"] for t in diverged} == {None, "nan"}


def test_stdout_counts_and_names_the_diverged_trials(main_sweep) -> None:
    done = main_sweep
    out = done.out
    data = strict_json(out / "report.json")
    names = [t["name"] for t in data["trials"] if t["diverged"]]
    line = next(line for line in done.stdout.splitlines() if line.startswith("diverged (5): "))
    assert all(f"{name} (" in line for name in names)
    assert "lrw-111 (SP, width 1024, lr 2^-6, seed 1)" in line
    assert done.stdout.splitlines()[0].endswith("112 trials, 107 completed, 5 diverged")


def test_transfer_png_is_a_plot_of_both_panels(main_sweep) -> None:
    out = main_sweep.out
    width, height = png_size(out / "transfer.png")
    assert 1000 <= width <= 1600 and 400 <= height <= 700
    assert (out / "transfer.png").stat().st_size > 30_000  # curves, not an empty frame


def test_best_yaml_is_the_mup_optimum_for_the_widest_width_and_validates(main_sweep) -> None:
    done = main_sweep
    out = done.out
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["name"] == "lrw-best" and best["run_dir"] == "runs/{name}"
    assert best["model"]["width"] == 1024 and best["model"]["mup"] is True
    assert best["optimizer"]["lr"] == 2.0 ** -9
    assert "trial" not in best and "sweep" not in best
    assert best["training"]["validation_interval"] == 50  # the rest is the trial's resolved spec
    validated = fljob("validate", str(out / "best.yaml"))
    assert validated.returncode == 0, validated.stderr
    assert "best.yaml: the muP optimum at width 128 (lr 2^-9" in done.stdout
    assert strict_json(out / "report.json")["best"]["name"] == "lrw-best"


def test_a_running_sweep_reports_what_is_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Missing summaries are listed; a running trial with the lowest loss is not an optimum."""
    def partial(spec: JobSpec) -> Outcome:
        e = round(math.log2(spec.optimizer.lr))
        if spec.model.width == 256 and e in (-12, -11, -10):
            return None
        if spec.model.width == 128 and e == -8:
            return "running", 3.0, 3.0
        if spec.model.width == 128 and e == -11:
            return "failed", 5.0, None
        return standard(spec)

    grid = {"model.width": [128, 256], "optimizer.lr": LRS}
    folder = build_sweep(tmp_path, partial, grid=grid)
    code, out, err = report(capsys, str(folder), "-o", str(tmp_path / "out"))
    assert code == 0, err
    data = strict_json(tmp_path / "out" / "report.json")
    assert optima(data, "muP") == {128: 2.0 ** -9, 256: 2.0 ** -9}
    assert data["counts"] == {"trials": 14, "completed": 9, "diverged": 0, "unfinished": 1, "failed": 1,
                              "missing": 3}
    missing = [t for t in data["trials"] if t["state"] == "missing"]
    assert [t["name"] for t in missing] == ["lrw-7", "lrw-8", "lrw-9"]
    assert missing[0]["problem"] == "no summary.json yet" and missing[0]["validation_loss"] is None
    assert "missing summaries (3): lrw-7: no summary.json yet, lrw-8: " in out
    assert ("not completed (not optima) (2): lrw-1 (muP, width 128, lr 2^-11, seed 0) failed at step 20/100, "
            "lrw-4 (muP, width 128, lr 2^-8, seed 0) running at step 60/100") in out


def test_an_lr_where_any_seed_diverged_is_no_optimum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def edge(spec: JobSpec) -> Outcome:
        if spec.model.width == 256 and spec.optimizer.lr == 2.0 ** -9 and spec.training.seed == 1:
            return "diverged", math.nan, None
        loss = u_loss(spec) - (0.01 if spec.optimizer.lr == 2.0 ** -10 else 0)
        return "completed", loss, loss

    grid = {"model.width": [128, 256], "optimizer.lr": LRS[1:6], "training.seed": [0, 1]}
    folder = build_sweep(tmp_path, edge, grid=grid)
    code, out, err = report(capsys, str(folder), "-o", str(tmp_path / "out"))
    assert code == 0, err
    data = strict_json(tmp_path / "out" / "report.json")
    assert optima(data, "muP") == {128: 2.0 ** -9, 256: 2.0 ** -10}
    point = next(p for p in data["groups"][0]["points"] if (p["width"], p["lr"]) == (256, 2.0 ** -9))
    assert (point["seeds"], point["diverged"]) == (1, 1)
    assert "muP: optimum moved 1 grid step down from width 128 to 256" in out


def test_a_width_where_everything_diverged_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def blowup(spec: JobSpec) -> Outcome:
        if spec.model.width == 512:
            return "diverged", math.nan, None
        loss = u_loss(spec)
        return "completed", loss, loss

    grid = {"model.width": [128, 256, 512], "optimizer.lr": LRS}
    folder = build_sweep(tmp_path, blowup, grid=grid)
    code, out, err = report(capsys, str(folder), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "width   512: no optimum: every learning rate diverged (7 trials)" in out
    assert "muP: optimum moved 0 grid steps from width 128 to 256 (lr 2^-9 -> 2^-9); width 512: no optimum" in out
    assert "diverged (7): " in out
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best["model"]["width"] == 512  # the widest swept is still the target
    png_size(tmp_path / "out" / "transfer.png")


def test_no_validation_loss_compares_train_loss_and_says_so(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    def train_only(spec: JobSpec) -> Outcome:
        return "completed", u_loss(spec), None

    folder = build_sweep(tmp_path, train_only, grid={"model.width": [128, 256], "optimizer.lr": LRS},
                         validation=False)
    code, out, err = report(capsys, str(folder), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "compared by the final train loss (no validation loss in the summaries)" in out
    data = strict_json(tmp_path / "out" / "report.json")
    assert data["metric"] == "train_loss" and optima(data, "muP") == {128: 2.0 ** -9, 256: 2.0 ** -9}


def test_sp_only_with_chosen_tuned_and_target_widths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = build_sweep(tmp_path, standard, grid={"model.mup": [False], "model.width": [128, 256, 512],
                                                   "optimizer.lr": LRS},
                         checkpoint_uri="s3://bucket/ckpt/lrw")
    out_dir = tmp_path / "out"
    code, out, err = report(capsys, str(folder), "-o", str(out_dir), "--tuned-width", "256",
                            "--target-width", "2048")
    assert code == 0, err
    best = yaml.safe_load((out_dir / "best.yaml").read_text())
    assert (best["model"]["width"], best["optimizer"]["lr"], best["model"]["mup"]) == (2048, 2.0 ** -8, False)
    assert best["checkpoint"]["uri"] == "s3://bucket/ckpt/lrw/lrw-best"  # never the trial's (lrw/lrw-4)
    assert "best.yaml holds an SP optimum" in out
    assert fljob("validate", str(out_dir / "best.yaml")).returncode == 0
    code, _, err = report(capsys, str(folder), "-o", str(out_dir), "--tuned-width", "300")
    assert code == 2 and "--tuned-width 300 was not swept; the widths with summaries are 128, 256, 512" in err
    code, _, err = report(capsys, str(folder), "-o", str(out_dir), "--target-width", "100")
    assert code == 2 and "--target-width 100 is not valid (model" in err


def test_a_folder_without_sweep_json_finds_trials_by_their_summaries(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of the trials' folders (what an object store prefix looks like): the trials
    that have no summary are missing by index, from the count the others carry."""
    def some(spec: JobSpec) -> Outcome:
        return None if spec.optimizer.lr == 2.0 ** -12 else standard(spec)

    folder = build_sweep(tmp_path, some, grid={"model.width": [128, 256], "optimizer.lr": LRS})
    (folder / SWEEP_INDEX_FILE).unlink()
    (folder / "lrw-7").mkdir()  # started, no summary yet; lrw-0 has not even a folder
    code, out, err = report(capsys, str(folder), "-o", str(tmp_path / "out"))
    assert code == 0, err
    data = strict_json(tmp_path / "out" / "report.json")
    assert data["grid"] == {"model.width": [128, 256], "optimizer.lr": LRS[1:]}
    assert [(t["index"], t["name"]) for t in data["trials"] if t["state"] == "missing"] == [(0, None), (7, None)]
    assert "missing summaries (2): trial 0: no readable summary.json under" in out
    assert optima(data, "muP") == {128: 2.0 ** -9, 256: 2.0 ** -9}


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_bad_runs_folders_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    one_line_error(*report(capsys, str(tmp_path / "nope"), "-o", out)[::2], "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(*report(capsys, str(tmp_path / "empty"), "-o", out)[::2], "is empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi\n")
    (tmp_path / "other" / "sub").mkdir()
    one_line_error(*report(capsys, str(tmp_path / "other"), "-o", out)[::2], "is not a sweep")
    one_line_error(*report(capsys, str(tmp_path / "other" / "notes.txt"), "-o", out)[::2], "is a file")
    folder = build_sweep(tmp_path, lambda spec: None, grid={"optimizer.lr": LRS[:2]})
    one_line_error(*report(capsys, str(folder), "-o", out)[::2], "none of its 2 trials has a summary.json")
    trial = build_sweep(tmp_path, standard, name="one", grid={"model.width": [128], "optimizer.lr": LRS[:2]}) / "one-0"
    one_line_error(*report(capsys, str(trial), "-o", out)[::2], "is one run", "not a sweep")
    (folder / SWEEP_INDEX_FILE).write_text("{\"trials\": 3}")
    one_line_error(*report(capsys, str(folder), "-o", out)[::2], "is not a sweep index fljob wrote")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_writes_nothing(main_sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = main_sweep.folder
    blocker = tmp_path / "file"
    blocker.write_text("keep me\n")
    code, _, err = report(capsys, str(folder), "-o", str(blocker / "report"))
    one_line_error(code, err, f"fljob sweep: cannot write {blocker}/report/report.json: a part of the path is "
                              "a file, not a folder. Choose another output folder, or free or fix that one; "
                              "nothing was written")
    assert blocker.read_text() == "keep me\n" and sorted(tmp_path.iterdir()) == [blocker]


def test_validate_and_the_parser_import_neither_matplotlib_nor_the_report(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: light\n")
    code = ("import sys; from fljob.cli import main; rc = main(['validate', sys.argv[1]]); "
            "heavy = {'matplotlib', 'fljob.sweep_report', 'torch'} & set(sys.modules); "
            "assert rc == 0 and not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
