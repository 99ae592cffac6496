"""The muP coordinate check: activations keep their size across widths under muP and grow
with width under the standard parametrisation; the command writes a valid PNG and its JSON,
exits 0 for the real muP and 1 when a muP rule is broken on purpose.

Most tests read one real run of ``fljob mup coord-check`` with the command's defaults for
the verdict (3 seeds, |muP slope| <= 0.15, SP control slope >= 1.2), made fast: the 7.61M
flavor (head_dim 64, like every real flavor) at depth 2, widths 128..512, 2 AdamW steps, a
512-token vocabulary (about 7 s on 2 cores). Measured there (slope of mean |activation|
against width on log-log axes after the last step, averaged over the seeds; 0 = flat, 1 =
grows like the width):

* muP, every layer kind: within 0.03 (single seeds up to 0.09). At init muP's logits shrink
  like 1/sqrt(width) (slope -0.5) by design: the 1/m logit multiplier on a
  width-independent init.
* SP: attention 1.50, FFN 2.02, logits 0.90.
* muP with w2 at its SP init and lr (fan-in ratio 1): FFN output 0.70; with the SP logit
  multiplier (1 instead of 1/m): logits 0.87 (single seeds 0.58 to 0.91 for the two). Both
  fail the verdict by far, so those runs take one seed.

Widths start at 128: at 64 the incoherent part of the first Adam updates (~lr*base/sqrt(width))
still lifts the narrowest model's branch outputs (slope about -0.2 over 64..512), a
finite-width effect that vanishes with width, not a parametrisation error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("torch", reason="torch (the trainer extra) is not installed")
pytest.importorskip("matplotlib", reason="matplotlib (coordinate-check plots) is not installed")

from fljob.cli import main
from fljob.spec.models import JobSpec
from fljob.trainer.coord_check import (
    PLOT_KINDS,
    SP_CONTROL_KINDS,
    Bounds,
    CoordCheckConfig,
    CoordCheckResult,
    args_at_width,
    run_coord_check,
    verdict,
    verdict_report,
    watched_modules,
)
from fljob.trainer.model.args import ModelArgs
from fljob.trainer.model.flavors import TINY_FLAVOR, get_flavor, with_shape
from fljob.trainer.model.model import MuPTransformer

REPO = Path(__file__).resolve().parents[2]
WIDTHS = (128, 256, 512)
STEPS = 2
FAST = ["--widths", ",".join(map(str, WIDTHS)), "--steps", str(STEPS), "--vocab-size", "512"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Run:
    """What one in-process ``fljob mup coord-check`` left behind."""

    code: int
    stdout: str
    stderr: str
    png: Path

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.png.with_suffix(".json").read_text())


def coord_check(folder: Path, *extra: str) -> Run:
    """``fljob mup coord-check`` on the fast head_dim-64 spec, in this process (so a test
    can break muP with monkeypatch), with the command's default verdict bounds and seeds."""
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "coord-check-test",
                                    "model": {"flavor": "7.61M", "depth": 2},
                                    "optimizer": {"name": "adamw", "lr": 3e-3}}))
    png = folder / "cc.png"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["mup", "coord-check", "--spec", str(spec), *FAST, *extra, "-o", str(png)])
    return Run(code, out.getvalue(), err.getvalue(), png)


@pytest.fixture(scope="module")
def passing(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return coord_check(tmp_path_factory.mktemp("coord-check"))


@pytest.fixture(scope="module")
def result(passing: Run) -> CoordCheckResult:
    data = passing.data
    return CoordCheckResult(data["config"], data["widths"], data["layers"], data["scales"])


@pytest.mark.slow
def test_command_passes_for_the_real_mup(passing: Run) -> None:
    assert passing.code == 0, passing.stdout + passing.stderr[-2000:]
    assert "PASS: muP activations are flat" in passing.stdout
    for kind in ("FFN output", "attention output", "logits"):
        assert any(line.startswith(kind) and "|s|<=0.15 PASS" in line
                   for line in passing.stdout.splitlines()), kind
    checks = passing.data["verdict"]
    assert checks["passed"] is True
    assert {(c["parametrisation"], c["kind"]) for c in checks["checks"]} == \
        {("mup", k) for k in PLOT_KINDS} | {("sp", k) for k in SP_CONTROL_KINDS}
    assert passing.data["config"]["seeds"] == 3 and passing.data["config"]["head_dim"] == 64


@pytest.mark.slow
@pytest.mark.parametrize(("attribute", "broken", "failing"), [
    # w2 at SP's init std and Adam lr: its fan-in ratio pinned to 1.
    ("ffn_width_mult", lambda self: 1.0, "FFN output"),
    # SP's logit multiplier instead of output_alpha / m.
    ("output_mult", lambda self: self.output_alpha, "logits"),
])
def test_command_fails_when_a_mup_rule_is_broken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  attribute: str, broken: Any,
                                                  failing: str) -> None:
    monkeypatch.setattr(ModelArgs, attribute, property(broken))
    run = coord_check(tmp_path, "--seeds", "1")
    assert run.code == 1, run.stdout
    assert "FAIL: under muP these activations change with width" in run.stdout
    row = next(line for line in run.stdout.splitlines() if line.startswith(failing))
    assert "|s|<=0.15 FAIL" in row
    failed = [c["kind"] for c in run.data["verdict"]["checks"] if not c["passed"]]
    assert {"FFN output": "ffn", "logits": "logits"}[failing] in failed


@pytest.mark.slow
def test_an_sp_that_does_not_grow_makes_the_verdict_inconclusive(result: CoordCheckResult) -> None:
    checks = verdict(result, Bounds(min_sp_slope=5.0))
    assert all(c.passed for c in checks if c.parametrisation == "mup")
    assert not any(c.passed for c in checks if c.parametrisation == "sp")
    assert "FAIL (inconclusive): SP did not grow" in verdict_report(result, checks)


@pytest.mark.slow
@pytest.mark.parametrize("kind", PLOT_KINDS)
def test_mup_activations_are_flat_across_widths(result: CoordCheckResult, kind: str) -> None:
    assert abs(result.kind_slope("mup", kind)) < 0.15
    if kind in ("residual", "final_norm", "logits"):
        for layer in result.layers:  # every block, not only their mean
            if layer.endswith(kind):
                assert abs(result.slope("mup", layer)) < 0.15, layer


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "least"), [("attention", 1.2), ("ffn", 1.2), ("logits", 0.5)])
def test_sp_activations_grow_with_width(result: CoordCheckResult, kind: str,
                                        least: float) -> None:
    assert result.kind_slope("sp", kind) > least
    # Growth is what training does to SP: it is steeper after the steps than at init.
    assert result.kind_slope("sp", kind) > result.kind_slope("sp", kind, t=0)


@pytest.mark.slow
def test_mup_logits_start_small_by_design(result: CoordCheckResult) -> None:
    # The 1/m multiplier on a width-independent init: logits shrink like 1/sqrt(width).
    assert result.kind_slope("mup", "logits", t=0) == pytest.approx(-0.5, abs=0.1)


def test_the_base_width_is_the_same_model_in_both_parametrisations() -> None:
    # At width == base_dim and depth == base_depth every muP multiplier is 1 (standard
    # attention scale: with head_dim fixed muP's 1/head_dim is only a constant factor), so
    # both runs are one computation, for every seed.
    spec = JobSpec(name="coord-check-test", model={"attention_scale": "standard"})
    config = CoordCheckConfig(widths=(128, 256), steps=1, vocab_size=300, seq_len=16, seeds=2)
    result = run_coord_check(spec, config, progress=False)
    i = result.widths.index(result.config["base_dim"])
    for layer in result.layers:
        for t in range(config.steps + 1):
            assert result.scales["mup"][layer][t][i] == pytest.approx(
                result.scales["sp"][layer][t][i], rel=1e-5), (layer, t)
    assert result.scales["mup"]["logits"][0][0] != result.scales["sp"]["logits"][0][0]


@pytest.mark.slow
def test_outputs_are_a_png_and_its_numbers(passing: Run, result: CoordCheckResult) -> None:
    assert passing.png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(passing.png) as image:
        image.verify()
        assert image.size[0] > 1000  # one column per layer kind, both parametrisations
    data = passing.data
    assert data["widths"] == list(WIDTHS) and set(data["scales"]) == {"mup", "sp"}
    logits = data["scales"]["mup"]["logits"]
    assert len(logits) == STEPS + 1 and all(len(row) == len(WIDTHS) for row in logits)
    assert data["slope_at_last_step"]["sp"]["logits"] == pytest.approx(
        result.slope("sp", "logits"))


def test_every_layer_kind_is_watched_in_every_block() -> None:
    args = get_flavor(TINY_FLAVOR, vocab_size=64)
    labels = list(watched_modules(MuPTransformer(args)))
    for kind in ("attention", "ffn", "residual"):
        assert [x for x in labels if x.endswith(kind)] == [
            f"block{i}.{kind}" for i in range(args.n_layers)]
    assert {x.split(".")[-1] for x in labels} == set(PLOT_KINDS)


def test_widths_keep_head_dim_and_head_ratio() -> None:
    base = get_flavor(TINY_FLAVOR)
    wide = args_at_width(base, 1024, mup=True)
    assert (wide.head_dim, wide.n_heads // wide.kv_heads) == (base.head_dim, base.n_heads // base.kv_heads)
    assert (wide.n_layers, wide.base_dim, wide.width_mult) == (base.n_layers, base.base_dim, 4.0)
    assert not args_at_width(base, 1024, mup=False).mup_enabled
    with pytest.raises(ValueError, match="head_dim"):
        args_at_width(base, 100, mup=True)
    # flavors.with_shape, with the check's own finer FFN rounding (and so its own base FFN
    # width: 688 for base width 256, m_ffn = 1368 / 688 at width 512).
    assert wide == dataclasses.replace(with_shape(base, width=1024), ffn_multiple_of=8)
    head_dim_64 = args_at_width(get_flavor("7.61M"), 512, mup=True)
    assert (head_dim_64.n_heads, head_dim_64.ffn_hidden_dim) == (8, 1368)
    assert head_dim_64.ffn_width_mult == pytest.approx(1368 / 688)


@pytest.mark.parametrize(("option", "value"), [
    ("--seeds", "0"), ("--steps", "0"), ("--vocab-size", "100"), ("--max-mup-slope", "0"),
    ("--min-sp-slope", "-1"), ("--widths", "64,100"),
])
def test_command_rejects_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     option: str, value: str) -> None:
    code = main(["mup", "coord-check", option, value, "-o", str(tmp_path / "cc.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and option in err, err
    assert not (tmp_path / "cc.png").exists()


def test_command_rejects_a_width_the_heads_do_not_divide(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fljob.cli", "mup", "coord-check", "--widths", "64,100",
         "-o", str(tmp_path / "cc.png")],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "head_dim" in result.stderr
