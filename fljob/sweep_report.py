"""`fljob sweep report`: does the optimal learning rate hold as the model gets wider?

Every trial of a sweep leaves a ``summary.json`` (:mod:`fljob.summary`) in its folder beside
the sweep's ``sweep.json``, and a copy beside its checkpoints when those are in object storage.
This module reads them (:func:`collect`), averages the seeds and finds the best learning rate
of every width, for muP and SP apart (:func:`analyse`), and turns that into report.json,
transfer.png and best.yaml (:func:`outputs`) and the lines printed (:func:`text`).

Rules, so that a verdict never rests on a broken run: only a completed trial with a finite
loss counts towards an optimum; a learning rate at which any seed diverged is not an optimum
(it is too close to the edge of stability to train a large model with); the loss compared is
the final held-out (validation) loss, or the final train loss, labelled as such, when no
trial has one. Never imports torch; matplotlib only while drawing.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fljob import storage
from fljob.errors import UsageError, elide
from fljob.files import OutFile
from fljob.spec.models import DERIVED_NAME_SUFFIXES, JobSpec
from fljob.spec.sweep import SWEEP_INDEX_FILE
from fljob.summary import SUMMARY_FILE, RunSummary
from fljob.summary import _encode as encode_non_finite  # NaN/inf spelt as in summary.json

LR_KEY = "optimizer.lr"
WIDTH_KEYS = ("model.width", "model.flavor")  # what sets a trial's width: the x of the verdict
SEED_KEY = "training.seed"
MUP_KEY = "model.mup"
REPORT_FILE, PLOT_FILE, BEST_FILE = "report.json", "transfer.png", "best.yaml"
LISTED = 20
"""Trials named per list (diverged, missing, unfinished) on stdout; report.json has them all."""


# --------------------------------------------------------------------------- collect


@dataclass(frozen=True)
class TrialResult:
    """One trial of the sweep: its summary, or why there is none."""

    index: int
    name: str | None  # None: known only by its index (no sweep.json, no summary)
    overrides: dict[str, Any]
    summary: RunSummary | None
    problem: str = ""  # why summary is None

    def _spec(self, section: str, key: str, default: Any = None) -> Any:
        spec = self.summary.spec if self.summary else {}
        return (spec.get(section) or {}).get(key, default)

    @property
    def state(self) -> str:
        return self.summary.state if self.summary else "missing"

    @property
    def diverged(self) -> bool:
        return self.summary is not None and (self.summary.diverged or self.summary.state == "diverged")

    @property
    def completed(self) -> bool:
        return self.state == "completed" and not self.diverged

    @property
    def lr(self) -> float | None:
        lr = self._spec("optimizer", "lr", self.overrides.get(LR_KEY))
        return None if lr is None else float(lr)

    @property
    def width(self) -> int | None:
        """What the trainer recorded, else the spec's model.width, else its flavor's."""
        if self.summary and self.summary.width:
            return self.summary.width
        width = self._spec("model", "width", self.overrides.get("model.width"))
        if width is None:
            from fljob.trainer.model.flavors import FLAVORS, TINY_FLAVOR  # torch-free

            flavor = self._spec("model", "flavor", self.overrides.get("model.flavor", "tiny"))
            args = FLAVORS.get(TINY_FLAVOR if flavor == "tiny" else flavor)
            width = args.dim if args else None
        return width

    @property
    def mup(self) -> bool:
        return bool(self._spec("model", "mup", self.overrides.get(MUP_KEY, True)))

    @property
    def seed(self) -> int | None:
        return self._spec("training", "seed", self.overrides.get(SEED_KEY))

    @property
    def label(self) -> str:
        return self.name or f"trial {self.index}"


@dataclass(frozen=True)
class Collected:
    """What RUNS holds: the sweep's name and grid and every trial, with or without summary."""

    sweep: str
    source: str
    grid: dict[str, list[Any]]
    trials: list[TrialResult]


def collect(runs: str) -> Collected:
    """Read every trial's summary under RUNS: a sweep's run folder or an s3:// prefix.

    With ``sweep.json`` (a run folder) the trials are the ones it names; without (an object
    store prefix, or a copied folder) they are the folders that hold a summary, and trials
    the summaries' count says exist but that have none are missing by index.
    """
    if not storage.is_s3(runs):
        _check_folder(Path(runs))
        collected = _collect(runs)
    else:
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise UsageError(f"reading {runs} needs boto3: pip install 'fljob[trainer]'") from None
        storage.check_bucket(runs)
        try:
            collected = _collect(runs)
        except (BotoCoreError, ClientError) as exc:
            raise UsageError(f"cannot read {runs}: {exc}") from None
    if not any(t.summary for t in collected.trials):
        raise UsageError(f"{runs}: none of its {len(collected.trials)} trials has a {SUMMARY_FILE} yet "
                         "(not started, or RUNS is not where the trials write); nothing to report")
    return collected


def _collect(runs: str) -> Collected:
    raw_index = storage.read_bytes(storage.join(runs, SWEEP_INDEX_FILE))
    if raw_index is not None:
        return _from_index(runs, _parse_index(runs, raw_index))
    folders = _subfolders(runs)
    return _from_summaries(runs, dict(zip(folders, _read_summaries(runs, folders), strict=True)))


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise UsageError(f"{folder} does not exist: give a sweep's run folder (the one with "
                         f"{SWEEP_INDEX_FILE}) or s3://bucket/prefix of its trials' checkpoints")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file: give a sweep's run folder (the one with {SWEEP_INDEX_FILE})")
    if not any(folder.iterdir()):
        raise UsageError(f"{folder} is empty: the sweep has not been submitted, or its run_dir is elsewhere")
    if (folder / SUMMARY_FILE).is_file() and not (folder / SWEEP_INDEX_FILE).is_file():
        raise UsageError(f"{folder} is one run (it holds a {SUMMARY_FILE}), not a sweep: give the folder "
                         f"of the sweep (the one with {SWEEP_INDEX_FILE}; a trial's parent folder)")


def _parse_index(runs: str, raw: bytes) -> dict[str, Any]:
    """sweep.json as fljob.spec.sweep.sweep_index wrote it, or a UsageError."""
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{storage.join(runs, SWEEP_INDEX_FILE)} is not JSON ({exc})") from None
    trials = index.get("trials") if isinstance(index, dict) else None
    if not isinstance(trials, list) or not isinstance(index.get("sweep"), str) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and "/" not in t["name"]
            and isinstance(t.get("index"), int) and isinstance(t.get("overrides"), dict) for t in trials):
        raise UsageError(f"{storage.join(runs, SWEEP_INDEX_FILE)} is not a sweep index fljob wrote")
    return index


def _read_summaries(runs: str, names: list[str]) -> list[bytes | None]:
    """Each named folder's summary.json (None where there is none), read in parallel: an
    object store answers one request at a time per connection."""
    read = _s3_reader() if storage.is_s3(runs) else storage.read_bytes
    uris = [storage.join(storage.join(runs, name), SUMMARY_FILE) for name in names]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, uris))


def _s3_reader() -> Callable[[str], bytes | None]:
    """storage.read_bytes with one client for every object: making a boto3 client costs about
    0.4 s, which per summary made a 112-trial report take 40 s instead of 1."""
    from botocore.exceptions import ClientError

    client = storage.s3_client()

    def read(uri: str) -> bytes | None:
        bucket, key = storage.split_s3(uri)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise

    return read


def _subfolders(runs: str) -> list[str]:
    if not storage.is_s3(runs):
        return sorted(p.name for p in Path(runs).iterdir() if p.is_dir())
    bucket, prefix = storage.split_s3(runs)
    prefix = f"{prefix}/" if prefix else ""
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/")
    return sorted(p["Prefix"][len(prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))


def _parse_summary(raw: bytes | None) -> tuple[RunSummary | None, str]:
    if raw is None:
        return None, f"no {SUMMARY_FILE} yet"
    try:
        return RunSummary.from_json(raw.decode("utf-8", errors="replace")), ""
    except ValueError as exc:
        return None, f"unreadable {SUMMARY_FILE}: {exc}"


def _from_index(runs: str, index: dict[str, Any]) -> Collected:
    entries = index["trials"]
    raws = _read_summaries(runs, [t["name"] for t in entries])
    trials = [TrialResult(t["index"], t["name"], t["overrides"], *_parse_summary(raw))
              for t, raw in zip(entries, raws, strict=True)]
    grid = index.get("grid") if isinstance(index.get("grid"), dict) else _grid_of(trials)
    return Collected(index["sweep"], runs, grid, trials)


def _from_summaries(runs: str, raws: dict[str, bytes | None]) -> Collected:
    found: dict[str, RunSummary] = {}
    for name, raw in raws.items():
        summary, _ = _parse_summary(raw)
        if summary is not None and summary.trial:
            found[name] = summary
    sweeps = sorted({s.trial["sweep"] for s in found.values()})
    if not sweeps:
        raise UsageError(f"{runs} is not a sweep: it has no {SWEEP_INDEX_FILE} and no <trial>/{SUMMARY_FILE} "
                         "of a sweep's trial (give the sweep's run folder, or the s3:// prefix its "
                         "trials checkpoint under)")
    if len(sweeps) > 1:
        raise UsageError(f"{runs} holds trials of {len(sweeps)} sweeps ({', '.join(sweeps)}): give the "
                         "folder or prefix of one")
    trials = [TrialResult(s.trial["index"], name, s.trial.get("overrides") or {}, s)
              for name, s in found.items()]
    count = max(int(s.trial.get("count") or 0) for s in found.values())
    present = {t.index for t in trials}
    trials += [TrialResult(i, None, {}, None, f"no readable {SUMMARY_FILE} under {runs}")
               for i in range(count) if i not in present]
    trials.sort(key=lambda t: t.index)
    return Collected(sweeps[0], runs, _grid_of(trials), trials)


def _grid_of(trials: list[TrialResult]) -> dict[str, list[Any]]:
    """The grid as the trials' overrides show it (values in trial order)."""
    grid: dict[str, list[Any]] = {}
    for trial in trials:
        for key, value in trial.overrides.items():
            if value not in grid.setdefault(key, []):
                grid[key].append(value)
    return grid


# --------------------------------------------------------------------------- analyse


@dataclass(frozen=True)
class Point:
    """One learning rate at one width of a group: its seeds."""

    width: int
    lr: float
    trials: tuple[TrialResult, ...]
    metric: str

    @property
    def losses(self) -> list[float]:
        """The finite final losses of the completed seeds."""
        values = [getattr(t.summary, self.metric) for t in self.trials if t.completed]
        return [v for v in values if v is not None and math.isfinite(v)]

    @property
    def diverged(self) -> int:
        return sum(t.diverged for t in self.trials)

    @property
    def eligible(self) -> bool:
        return bool(self.losses) and not self.diverged

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.losses) if self.losses else None


@dataclass(frozen=True)
class Optimum:
    width: int
    point: Point | None
    grid_step: int | None  # position of its lr in the sorted swept learning rates
    at_edge: bool
    reason: str = ""  # why there is none


@dataclass(frozen=True)
class Verdict:
    from_width: int | None
    to_width: int | None
    steps: int | None  # signed: > 0 the wider model wants a larger learning rate
    text: str


@dataclass(frozen=True)
class Group:
    """The trials of one parametrisation (and of one value of every other swept field)."""

    label: str
    mup: bool
    fixed: dict[str, Any]
    points: list[Point]
    optima: list[Optimum]
    verdict: Verdict


@dataclass(frozen=True)
class Best:
    group: Group
    optimum: Optimum
    trial: TrialResult
    spec: JobSpec


@dataclass(frozen=True)
class Analysis:
    collected: Collected
    metric: str
    lrs: list[float]
    widths: list[int]
    seeds: list[Any]
    groups: list[Group]
    tuned_width: int
    target_width: int
    best: Best | None
    best_note: str  # why there is no best.yaml, or what to know about it


def lr_text(lr: float) -> str:
    """2^-9 for a power of two, else three significant digits."""
    exponent = math.log2(lr)
    return f"2^{round(exponent)}" if abs(exponent - round(exponent)) < 1e-9 else f"{lr:.3g}"


def analyse(collected: Collected, tuned_width: int | None = None, target_width: int | None = None) -> Analysis:
    """Seeds averaged, the optimum per width and group, the verdicts and the spec of best.yaml."""
    usable = [t for t in collected.trials if t.summary and t.lr is not None and t.width is not None]
    if not usable:
        raise UsageError(f"{collected.source}: no summary names a learning rate and a width")
    scored = [t for t in usable if t.completed]
    metric = "validation_loss" if any(t.summary.validation_loss is not None for t in scored) else "train_loss"
    lrs = sorted({float(v) for v in collected.grid.get(LR_KEY, [])} | {t.lr for t in usable})
    widths = sorted({t.width for t in usable})
    if tuned_width is not None and tuned_width not in widths:
        raise UsageError(f"--tuned-width {tuned_width} was not swept; the widths with summaries are "
                         f"{', '.join(map(str, widths))}")
    tuned = widths[0] if tuned_width is None else tuned_width
    target = widths[-1] if target_width is None else target_width
    seeds = sorted({t.seed for t in usable if t.seed is not None})
    by_group: dict[tuple[Any, ...], list[TrialResult]] = {}
    for trial in usable:
        by_group.setdefault(_group_key(trial), []).append(trial)
    groups = [_group(key, trials, metric, lrs, widths) for key, trials in sorted(by_group.items(), key=_group_order)]
    best, note = _best(collected, groups, tuned, target)
    return Analysis(collected, metric, lrs, widths, seeds, groups, tuned, target, best, note)


def _group_key(trial: TrialResult) -> tuple[Any, ...]:
    """muP or SP, and the values of every swept field that is not lr, width or seed."""
    others = sorted((k, repr(v)) for k, v in trial.overrides.items()
                    if k not in (LR_KEY, SEED_KEY, MUP_KEY, *WIDTH_KEYS))
    return (trial.mup, *others)


def _group_order(item: tuple[tuple[Any, ...], list[TrialResult]]) -> tuple[Any, ...]:
    key, _ = item
    return (not key[0], key[1:])  # muP first


def _group(key: tuple[Any, ...], trials: list[TrialResult], metric: str, lrs: list[float],
           widths: list[int]) -> Group:
    mup, *others = key
    fixed = {k: trials[0].overrides[k] for k, _ in others}
    label = ", ".join(["muP" if mup else "SP", *(f"{k}={v}" for k, v in fixed.items())])
    cells: dict[tuple[int, float], list[TrialResult]] = {}
    for trial in trials:
        cells.setdefault((trial.width, trial.lr), []).append(trial)
    points = [Point(w, lr, tuple(sorted(ts, key=lambda t: t.index)), metric)
              for (w, lr), ts in sorted(cells.items())]
    optima = [_optimum(w, [p for p in points if p.width == w], lrs) for w in widths
              if any(p.width == w for p in points)]
    return Group(label, mup, fixed, points, optima, _verdict(label, optima))


def _optimum(width: int, points: list[Point], lrs: list[float]) -> Optimum:
    eligible = [p for p in points if p.eligible]
    if eligible:
        best = min(eligible, key=lambda p: (p.mean, p.lr))
        step = lrs.index(best.lr)
        return Optimum(width, best, step, len(lrs) > 1 and step in (0, len(lrs) - 1))
    trials = [t for p in points for t in p.trials]
    diverged = sum(t.diverged for t in trials)
    if diverged == len(trials):
        reason = f"every learning rate diverged ({diverged} trials)"
    else:
        unfinished = sum(not t.diverged and not t.completed for t in trials)
        reason = (f"no learning rate completed without a divergence ({diverged} diverged, "
                  f"{unfinished} not completed)")
    return Optimum(width, None, None, False, reason)


def _verdict(label: str, optima: list[Optimum]) -> Verdict:
    found = [o for o in optima if o.point]
    if len(optima) < 2:
        return Verdict(None, None, None, f"{label}: one width only, nothing to compare")
    if len(found) < 2:
        return Verdict(None, None, None, f"{label}: no verdict: {len(found)} of {len(optima)} widths "
                                         "have an optimum")
    first, last = found[0], found[-1]
    steps = last.grid_step - first.grid_step
    direction = "" if steps == 0 else " up" if steps > 0 else " down"
    text = (f"{label}: optimum moved {abs(steps)} grid step{'' if abs(steps) == 1 else 's'}{direction} "
            f"from width {first.width} to {last.width} (lr {lr_text(first.point.lr)} -> "
            f"{lr_text(last.point.lr)})")
    left_out = [str(o.width) for o in optima if o.point is None and not first.width < o.width < last.width]
    if left_out:
        text += f"; width {', '.join(left_out)}: no optimum"
    if first.at_edge or last.at_edge:
        text += "; an optimum is at the edge of the lr grid (widen the grid to be sure)"
    return Verdict(first.width, last.width, steps, text)


def _best(collected: Collected, groups: list[Group], tuned: int, target: int) -> tuple[Best | None, str]:
    """The muP optimum at the tuned width (SP only when no muP was swept), as a spec for the
    target width."""
    candidates = [g for g in groups if g.mup] or groups
    found = [(g, o) for g in candidates for o in g.optima if o.width == tuned and o.point]
    if not found:
        reasons = "; ".join(f"{g.label}: {o.reason}" for g in candidates for o in g.optima if o.width == tuned)
        return None, f"no {BEST_FILE}: no optimum at the tuned width {tuned} ({reasons or 'no trials'})"
    group, optimum = min(found, key=lambda found: found[1].point.mean)
    trial = next(t for t in optimum.point.trials if t.completed)
    spec = _best_spec(collected.sweep, trial, target)
    note = "" if group.mup else (f"{BEST_FILE} holds an SP optimum: in SP the best learning rate moves "
                                 "with width, so it may not suit the target width")
    return Best(group, optimum, trial, spec), note


def _best_spec(sweep: str, trial: TrialResult, target: int) -> JobSpec:
    """The trial's resolved spec as a job of its own at the target width."""
    from pydantic import ValidationError

    data = json.loads(json.dumps(trial.summary.spec))
    data.pop("trial", None)
    data.pop("sweep", None)
    longest = max(map(len, DERIVED_NAME_SUFFIXES))
    name = f"{sweep[:63 - longest - len('-best')].rstrip('-')}-best"
    data.update(name=name, run_dir="runs/{name}")
    data.setdefault("model", {})["width"] = target
    checkpoint = data.get("checkpoint") or {}
    uri = (checkpoint.get("uri") or "").rstrip("/")
    if trial.name and uri.endswith(f"/{trial.name}"):  # the trial's own folder: never resume from it
        checkpoint["uri"] = f"{uri.removesuffix(trial.name)}{name}"
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"the optimum's spec at --target-width {target} is not valid ({where}: "
                         f"{first['msg']}); choose a width the model accepts") from None


# --------------------------------------------------------------------------- outputs


def _metric_label(metric: str, short: bool = False) -> str:
    if metric == "validation_loss":
        return "validation loss"
    return "train loss" if short else "train loss (no validation loss in the summaries)"


def _trial_record(trial: TrialResult) -> dict[str, Any]:
    s = trial.summary
    return {
        "index": trial.index, "name": trial.name, "overrides": trial.overrides, "state": trial.state,
        "lr": trial.lr if s else None, "width": trial.width if s else None,
        "mup": trial.mup if s else None, "seed": trial.seed if s else None,
        "step": s.step if s else None, "steps": s.steps if s else None,
        "train_loss": s.train_loss if s else None, "validation_loss": s.validation_loss if s else None,
        "validation_step": s.validation_step if s else None, "diverged": trial.diverged,
        "problem": trial.problem or None,
    }


def _point_record(p: Point) -> dict[str, Any]:
    losses = p.losses
    return {"width": p.width, "lr": p.lr, "mean": p.mean, "min": min(losses, default=None),
            "max": max(losses, default=None), "seeds": len(losses), "diverged": p.diverged,
            "trials": [t.label for t in p.trials]}


def _optimum_record(o: Optimum, base: Optimum | None) -> dict[str, Any]:
    if o.point is None:
        return {"width": o.width, "lr": None, "reason": o.reason}
    return {**_point_record(o.point), "loss": o.point.mean, "grid_step": o.grid_step,
            "shift": None if base is None else o.grid_step - base.grid_step, "at_edge": o.at_edge}


def report_data(analysis: Analysis) -> dict[str, Any]:
    """report.json: every trial, every group's points, optima and verdict, and best.yaml's origin."""
    trials = analysis.collected.trials
    groups = []
    for g in analysis.groups:
        base = next((o for o in g.optima if o.width == g.verdict.from_width), None)
        groups.append({"label": g.label, "mup": g.mup, "fixed": g.fixed,
                       "optima": [_optimum_record(o, base) for o in g.optima],
                       "verdict": {"from_width": g.verdict.from_width, "to_width": g.verdict.to_width,
                                   "steps": g.verdict.steps, "text": g.verdict.text},
                       "points": [_point_record(p) for p in g.points]})
    best = analysis.best
    return {
        "schema": 1, "sweep": analysis.collected.sweep, "source": analysis.collected.source,
        "grid": analysis.collected.grid, "metric": analysis.metric, "learning_rates": analysis.lrs,
        "widths": analysis.widths, "seeds": analysis.seeds, "tuned_width": analysis.tuned_width,
        "target_width": analysis.target_width, "counts": _counts(trials),
        "best": None if best is None else {
            "file": BEST_FILE, "group": best.group.label, "trial": best.trial.name, "lr": best.optimum.point.lr,
            "loss": best.optimum.point.mean, "tuned_width": analysis.tuned_width,
            "target_width": analysis.target_width, "name": best.spec.name},
        "best_note": analysis.best_note or None,
        "groups": groups, "trials": [_trial_record(t) for t in trials],
    }


def _counts(trials: list[TrialResult]) -> dict[str, int]:
    counts = {"trials": len(trials), "completed": 0, "diverged": 0, "unfinished": 0, "failed": 0, "missing": 0}
    for t in trials:
        kind = ("diverged" if t.diverged else "completed" if t.completed else "missing" if t.summary is None
                else "failed" if t.state == "failed" else "unfinished")
        counts[kind] += 1
    return counts


def _listing(title: str, trials: list[TrialResult], describe: Callable[[TrialResult], str]) -> list[str]:
    if not trials:
        return []
    shown = ", ".join(describe(t) for t in trials[:LISTED])
    more = f", and {len(trials) - LISTED} more ({REPORT_FILE} lists all)" if len(trials) > LISTED else ""
    return [f"{title} ({len(trials)}): {shown}{more}"]


def text(analysis: Analysis, written: list[Path]) -> str:
    """What the command prints: counts, the optimum per width, the verdicts, the odd trials."""
    trials = analysis.collected.trials
    counts = _counts(trials)
    lines = [f"sweep {analysis.collected.sweep} ({elide(analysis.collected.source)}): {counts['trials']} trials, "
             + ", ".join(f"{n} {k}" for k, n in counts.items() if k != "trials" and n)]
    seeds = f", mean of {len(analysis.seeds)} seeds" if len(analysis.seeds) > 1 else ""
    lines.append(f"compared by the final {_metric_label(analysis.metric)}{seeds}; "
                 f"{len(analysis.lrs)} learning rates, widths {', '.join(map(str, analysis.widths))}")
    for g in analysis.groups:
        lines.append(f"{g.label}:")
        for o in g.optima:
            if o.point is None:
                lines.append(f"  width {o.width:>5}: no optimum: {o.reason}")
                continue
            losses = o.point.losses
            spread = f" (±{(max(losses) - min(losses)) / 2:.4f}, {len(losses)} seeds)" if len(losses) > 1 else ""
            edge = " [edge of the lr grid]" if o.at_edge else ""
            lines.append(f"  width {o.width:>5}: lr {lr_text(o.point.lr)} (grid step {o.grid_step + 1} of "
                         f"{len(analysis.lrs)}), {_metric_label(analysis.metric, short=True)} "
                         f"{o.point.mean:.4f}{spread}{edge}")
    lines += [f"verdict: {g.verdict.text}" for g in analysis.groups]

    def where(t: TrialResult) -> str:
        lr = lr_text(t.lr) if t.lr else "?"
        return f"{t.label} ({'muP' if t.mup else 'SP'}, width {t.width}, lr {lr}, seed {t.seed})"

    lines += _listing("diverged", [t for t in trials if t.diverged], where)
    lines += _listing("not completed (not optima)",
                      [t for t in trials if t.summary and not t.diverged and not t.completed],
                      lambda t: f"{where(t)} {t.state} at step {t.summary.step}/{t.summary.steps}")
    lines += _listing("missing summaries", [t for t in trials if t.summary is None],
                      lambda t: f"{t.label}: {t.problem}")
    if analysis.best:
        b = analysis.best
        lines.append(f"{BEST_FILE}: the {b.group.label} optimum at width {analysis.tuned_width} "
                     f"(lr {lr_text(b.optimum.point.lr)}, trial {b.trial.label}) as job "
                     f"{b.spec.name} at width {analysis.target_width}")
    if analysis.best_note:
        lines.append(analysis.best_note)
    lines += [f"wrote {p}" for p in written]
    return "\n".join(lines) + "\n"


def _y_range(values: list[float]) -> tuple[float, float]:
    """The bottom of the loss axis and the ceiling above which losses are drawn clipped:
    Tukey's fence for far-out values (Q3 + 3 IQR), so a few huge losses do not flatten the
    curves."""
    low, high = min(values), max(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        high = min(high, q3 + 3 * (q3 - q1))
    span = (high - low) or max(abs(low) * 0.05, 0.1)
    return low - 0.05 * span, high + 0.02 * span


def _lr_tex(lr: float) -> str:
    """lr_text as a tick label: a real superscript."""
    text = lr_text(lr)
    return f"$2^{{{text[2:]}}}$" if text.startswith("2^") else text


def plot(analysis: Analysis) -> bytes:
    """transfer.png: loss against learning rate, a line per width, a panel per group."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"{PLOT_FILE} needs matplotlib: pip install 'fljob[trainer]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    means = [p.mean for g in analysis.groups for p in g.points if p.mean is not None]
    bottom, ceiling = _y_range(means or [0.0])
    strip = 0.03 + 0.04 * len(analysis.widths)  # the top of each panel: a row of diverged marks per width
    top = ceiling + (ceiling - bottom) * strip / (1 - strip)
    colors = plt.get_cmap("viridis")
    shade = {w: colors(i / max(1, len(analysis.widths) - 1) * 0.9) for i, w in enumerate(analysis.widths)}
    fig, axes = plt.subplots(1, len(analysis.groups), figsize=(5.2 * len(analysis.groups) + 1.4, 4.8),
                             sharey=True, squeeze=False, layout="constrained")
    clipped = diverged = 0
    for ax, group in zip(axes[0], analysis.groups, strict=True):
        for width in analysis.widths:
            points = [p for p in group.points if p.width == width]
            if not points:
                continue
            shown = [p for p in points if p.mean is not None]
            color = shade[width]
            xs = [p.lr for p in shown]
            ax.plot(xs, [min(p.mean, ceiling) for p in shown], "-o", color=color, ms=4)
            ax.fill_between(xs, [min(min(p.losses), ceiling) for p in shown],
                            [min(max(p.losses), ceiling) for p in shown], color=color, alpha=0.2, lw=0)
            high = [p for p in shown if p.mean > ceiling]
            clipped += len(high)
            ax.plot([p.lr for p in high], [ceiling] * len(high), "^", color=color, ms=8, mfc="none")
            bad = [p for p in points if p.diverged]
            diverged += sum(p.diverged for p in bad)
            row = 0.97 - 0.04 * analysis.widths.index(width)
            ax.plot([p.lr for p in bad], [row] * len(bad), "x", color=color, ms=7, mew=2,
                    transform=ax.get_xaxis_transform())
        for o in group.optima:
            if o.point:
                ax.plot([o.point.lr], [o.point.mean], "*", color=shade[o.width], ms=16, mec="black", zorder=5)
        if clipped or diverged:
            ax.axhline(ceiling, color="grey", lw=0.6, ls=":")  # above it: marks, not losses
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(analysis.lrs, [_lr_tex(lr) for lr in analysis.lrs], fontsize=8)
        ax.set_ylim(bottom, top)
        ax.set_xlabel(f"{LR_KEY} (log2)")
        verdict = textwrap.fill(group.verdict.text.removeprefix(f"{group.label}: "), width=70)
        ax.set_title(f"{group.label}\n{verdict}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final {_metric_label(analysis.metric)}")
    handles = [Line2D([], [], color=shade[w], marker="o", label=f"width {w}") for w in analysis.widths]
    handles += [Line2D([], [], ls="", marker="*", ms=12, color="grey", mec="black", label="optimum")]
    if diverged:
        handles.append(Line2D([], [], ls="", marker="x", mew=2, color="grey", label=f"diverged ({diverged})"))
    if clipped:
        handles.append(Line2D([], [], ls="", marker="^", mfc="none", color="grey", label=f"above the axis ({clipped})"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    seeds = f", mean of {len(analysis.seeds)} seeds (band: min to max)" if len(analysis.seeds) > 1 else ""
    left_out = _counts(analysis.collected.trials)
    note = ", ".join(f"{left_out[k]} {k}" for k in ("unfinished", "failed", "missing") if left_out[k])
    fig.suptitle(f"{analysis.collected.sweep}: swept {', '.join(analysis.collected.grid)}{seeds}"
                 + (f"\nnot plotted: {note} trials" if note else ""), fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def best_yaml(analysis: Analysis) -> str:
    """best.yaml: the optimum's resolved spec at the target width, with where it came from."""
    from fljob.spec import dump_spec

    b = analysis.best
    assert b is not None
    point = b.optimum.point
    return (f"# fljob sweep report of {analysis.collected.sweep}: the {b.group.label} optimum at width "
            f"{analysis.tuned_width} (trial {b.trial.label}: {LR_KEY} {point.lr:g}, final "
            f"{_metric_label(analysis.metric, short=True)} {point.mean:.4f} over {len(point.losses)} seed(s)),\n"
            f"# for width {analysis.target_width}. Check: fljob validate best.yaml; "
            f"run: fljob submit --backend <slurm|k8s|local> best.yaml\n" + dump_spec(b.spec))


def outputs(analysis: Analysis) -> list[OutFile]:
    """The files of the report (best.yaml only when there is an optimum to transfer)."""
    data = json.dumps(encode_non_finite(report_data(analysis)), indent=1, allow_nan=False) + "\n"
    files = [OutFile(REPORT_FILE, data), OutFile(PLOT_FILE, plot(analysis))]
    if analysis.best is not None:
        files.append(OutFile(BEST_FILE, best_yaml(analysis)))
    return files


def report(runs: str, out: Path, tuned_width: int | None = None, target_width: int | None = None) -> str:
    """collect -> analyse -> write every file or none; returns what to print."""
    from fljob.files import write_files

    analysis = analyse(collect(runs), tuned_width, target_width)
    return text(analysis, write_files(out, outputs(analysis)))
