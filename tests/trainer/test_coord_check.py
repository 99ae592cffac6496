"""The muP coordinate check: activations keep their size across widths under muP and grow
with width under the standard parametrisation; the command writes a valid PNG and its JSON.

Tolerances, on the log-log slope of mean |activation| against width (0 = flat, 1 = grows
like the width), after 2 AdamW steps at widths 128, 256, 512 (measured over two seeds):

* muP, every layer kind (block layers averaged over the 4 blocks): |slope| < 0.15
  (measured -0.05 to 0.11); the residual stream, final norm and logits also per layer.
  Single blocks' branch outputs are noisier at 3 widths and 2 steps (up to 0.34) and are
  checked through their mean only. At init muP's logits shrink like 1/sqrt(width)
  (slope -0.5) by design: the 1/m logit multiplier on a width-independent init.
* SP: attention and FFN outputs slope > 1.0 (measured 1.42 to 2.05), logits > 0.5
  (1.03 to 1.09): each update adds lr x width to them.

Widths start at 128: at 64 the incoherent part of the first Adam updates (~lr*base/sqrt(width))
still lifts the narrowest model's branch outputs (slope about -0.2 over 64..512), a
finite-width effect that vanishes with width, not a parametrisation error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch (the trainer extra) is not installed")
pytest.importorskip("matplotlib", reason="matplotlib (coordinate-check plots) is not installed")

from fljob.spec.models import JobSpec
from fljob.trainer.coord_check import (
    PLOT_KINDS,
    CoordCheckConfig,
    CoordCheckResult,
    args_at_width,
    loglog_slope,
    run_coord_check,
    watched_modules,
    write_outputs,
)
from fljob.trainer.model.flavors import TINY_FLAVOR, get_flavor
from fljob.trainer.model.model import MuPTransformer

REPO = Path(__file__).resolve().parents[2]
WIDTHS = (128, 256, 512)
STEPS = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result() -> CoordCheckResult:
    # Standard attention scale: with head_dim fixed across widths muP's 1/head_dim is only a
    # constant factor, and with it the base width is exactly the SP model (tested below).
    spec = JobSpec(name="coord-check-test", optimizer={"name": "adamw", "lr": 3e-3},
                   model={"attention_scale": "standard"})
    config = CoordCheckConfig(widths=WIDTHS, steps=STEPS, vocab_size=512, batch_size=4,
                              seq_len=32)
    return run_coord_check(spec, config, progress=False)


def kind_slope(result: CoordCheckResult, parametrisation: str, kind: str, t: int = -1) -> float:
    return loglog_slope(result.widths, result.kind_scales(parametrisation, kind)[t])


@pytest.mark.slow
@pytest.mark.parametrize("kind", PLOT_KINDS)
def test_mup_activations_are_flat_across_widths(result: CoordCheckResult, kind: str) -> None:
    assert abs(kind_slope(result, "mup", kind)) < 0.15
    if kind in ("residual", "final_norm", "logits"):
        for layer in result.layers:  # every block, not only their mean
            if layer.endswith(kind):
                assert abs(result.slope("mup", layer)) < 0.15, layer


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "least"), [("attention", 1.0), ("ffn", 1.0), ("logits", 0.5)])
def test_sp_activations_grow_with_width(result: CoordCheckResult, kind: str,
                                        least: float) -> None:
    assert kind_slope(result, "sp", kind) > least
    # Growth is what training does to SP: it is steeper after the steps than at init.
    assert kind_slope(result, "sp", kind) > kind_slope(result, "sp", kind, t=0)


@pytest.mark.slow
def test_mup_logits_start_small_by_design(result: CoordCheckResult) -> None:
    # The 1/m multiplier on a width-independent init: logits shrink like 1/sqrt(width).
    assert kind_slope(result, "mup", "logits", t=0) == pytest.approx(-0.5, abs=0.1)


@pytest.mark.slow
def test_the_base_width_is_the_same_model_in_both_parametrisations(
        result: CoordCheckResult) -> None:
    # At width == base_dim every muP multiplier is 1, so both runs are one computation.
    i = result.widths.index(result.config["base_dim"])
    for layer in result.layers:
        for t in range(STEPS + 1):
            assert result.scales["mup"][layer][t][i] == pytest.approx(
                result.scales["sp"][layer][t][i], rel=1e-5), (layer, t)


@pytest.mark.slow
def test_outputs_are_a_png_and_its_numbers(result: CoordCheckResult, tmp_path: Path) -> None:
    png, raw = write_outputs(result, tmp_path / "plots" / "cc.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
        assert image.size[0] > 1000  # one column per layer kind, both parametrisations
    data = json.loads(raw.read_text())
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


@pytest.mark.slow
def test_command_writes_png_and_json(tmp_path: Path) -> None:
    out = tmp_path / "cc.png"
    result = subprocess.run(
        [sys.executable, "-m", "fljob.cli", "mup", "coord-check", "--widths", "32,64",
         "--steps", "1", "-o", str(out)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads(out.with_suffix(".json").read_text())["widths"] == [32, 64]
    assert "muP slope" in result.stdout and "logits" in result.stdout


def test_command_rejects_a_width_the_heads_do_not_divide(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fljob.cli", "mup", "coord-check", "--widths", "64,100",
         "-o", str(tmp_path / "cc.png")],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "head_dim" in result.stderr
