"""YAML beyond plain data: merge keys work, tags are refused, aliases cannot explode.

Specs, site profiles and `--set` values go through one loader. The property test mutates the
example specs (tags, anchors and aliases, merge keys, cut and duplicated text) and asserts that
loading ends with a spec or with a SpecError (exit 2 at the CLI), never another exception, and
within a time bound; the alias bombs run through the real CLI under a memory limit.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fljob.spec import SpecError, load_spec, load_spec_text
from fljob.spec.loader import MAX_VALUES

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))


def laughs(levels: int, fan: int = 10) -> str:
    """Nested aliases: `levels` lines of YAML that stand for fan**levels strings."""
    lines = [f"l0: &l0 [{', '.join(['ha'] * fan)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\nname: bomb\n"


def test_merge_keys_apply_with_the_mappings_own_keys_winning(tmp_path: Path) -> None:
    spec = load_spec_text(
        "x-small: &small {steps: 3, seq_len: 32, log_interval: 1}\n"
        "x-cpu: &cpu {local_batch_size: 2, seq_len: 16}\n"
        "name: merged\n"
        "training:\n  <<: [*small, *cpu]\n  steps: 7\n", "spec.yaml")
    # own key beats both; the first merged mapping beats the second; x- keys are not fields
    assert (spec.training.steps, spec.training.seq_len, spec.training.local_batch_size) == (7, 32, 2)
    with pytest.raises(SpecError) as err:
        load_spec_text("x-d: &d {steps: 0}\nname: m\ntraining: {<<: *d}\n", "spec.yaml")
    (problem,) = err.value.problems
    assert problem.field == "training.steps" and problem.origin == "spec.yaml:1:10"  # inside the anchor


@pytest.mark.parametrize("text, shown", [
    ("name: !!python/object/apply:os.system [echo pwned]\n", "!!python/object/apply:os.system"),
    ("name: !!python/name:os.system x\n", "!!python/name:os.system"),
    ("name: !env HOME\n", "!env"),
    ("name: ok\nenv: !!set {a, b}\n", "!!set"),
    ("name: ok\nenv: !!omap [{A: b}]\n", "!!omap"),
    ("name: !!binary aGVsbG8=\n", "!!binary"),
])
def test_tags_are_refused_with_the_position(text: str, shown: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec_text(text, "spec.yaml")
    assert any(shown in p.message and p.origin.startswith("spec.yaml:") for p in err.value.problems), err.value


def test_set_values_and_site_profiles_go_through_the_same_loader(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="YAML tags are not supported"):
        load_spec_text("name: ok\n", overrides=["image=!!python/object/apply:os.system [id]"])
    with pytest.raises(SpecError, match="expands to more than"):
        load_spec_text("name: ok\n", overrides=[f"env.A={laughs(7)[:-12].replace(chr(10), ', ').join('{}')}"])
    site = tmp_path / "site.yaml"
    site.write_text("slurm: {partition: !env PART}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: ok\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec, site=site)
    assert err.value.problems[0].origin == f"{site}:1:20"  # the tagged value


@pytest.mark.parametrize("text", [laughs(9), laughs(30, fan=2), "name: " + "[" * 20000 + "]" * 20000 + "\n",
                                  "name: x\n" + "#" * (2 << 20)])
def test_bombs_end_in_one_line_fast_and_small_through_the_cli(tmp_path: Path, text: str) -> None:
    spec = tmp_path / "bomb.yaml"
    spec.write_text(text)

    def limit() -> None:  # 1 GiB of address space: a billion expanded strings would need far more
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fljob.cli", "validate", str(spec)], capture_output=True,
                          text=True, timeout=60, preexec_fn=limit, check=False)
    assert time.monotonic() - start < 20
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.splitlines()) == 2, done.stderr[:2000]  # the head line and one problem


# --------------------------------------------------------------------------- the property

def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


EXAMPLE_LINES = [_lines(p) for p in EXAMPLES]
TAGS = st.sampled_from(["!!python/object:os.system ", "!env ", "!!str ", "!!int ", "!!float ", "!!binary ",
                        "!!set ", "!!map ", "!!seq ", "!x ", "!!timestamp ", "!!null "])
PIECES = st.sampled_from(["&a ", "*a", "<<: *a", "<<: [*a, *a]", "<<: 3", "{<<: *a}", "[*a, *a, *a]", ": ",
                          "- ", "{", "}", "[", "]", "'", '"', "\t", "\\", "%YAML 1.1\n", "---\n", "...", "? ",
                          "\u00e9", "\x00", "~"])


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    lines = list(draw(st.sampled_from(EXAMPLE_LINES)))
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["tag", "piece", "dup", "cut", "indent", "anchor-alias"]))
        line = lines[i]
        if kind == "tag" and ": " in line:
            key, _, value = line.partition(": ")
            lines[i] = f"{key}: {draw(TAGS)}{value}"
        elif kind == "piece":
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(PIECES) + line[at:]
        elif kind == "dup":
            lines.insert(i, line)
        elif kind == "cut":
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif kind == "indent":
            lines[i] = " " * draw(st.integers(1, 4)) + line
        elif ": " in line:  # give a value an anchor, and point a later key at it
            key, _, value = line.partition(": ")
            lines[i] = f"{key}: &a {value}"
            lines.insert(draw(st.integers(i + 1, len(lines))), f"{key.strip()}: *a")
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_specs())
def test_any_mutated_spec_loads_or_is_a_spec_error_quickly(text: str) -> None:
    start = time.monotonic()
    try:
        load_spec_text(text, "spec.yaml")
    except SpecError as exc:
        assert exc.problems and all(p.origin.startswith(("spec.yaml", "--set")) for p in exc.problems)
    assert time.monotonic() - start < 2.0


@settings(max_examples=50, deadline=None)
@given(levels=st.integers(2, 12), fan=st.integers(2, 12))
def test_alias_expansion_is_bounded(levels: int, fan: int) -> None:
    start = time.monotonic()
    try:
        load_spec_text(laughs(levels, fan), "spec.yaml")
    except SpecError as exc:
        bomb = "expands to more than" in str(exc)
        assert bomb or "unknown field" in str(exc)
        assert bomb or fan ** levels <= MAX_VALUES  # the last level alone stands for fan**levels values
    assert time.monotonic() - start < 2.0
