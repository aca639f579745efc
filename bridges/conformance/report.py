"""Run cases through runners, compare with the expected values, and render the results.

Per (case, framework) the result holds, for each quantity of ``QUANTITIES``, the maximum absolute
difference to the expected value over all items (terms, stats or parameter entries), and the
item where it occurs. Status: ``PASS`` (every quantity within ``TOLERANCES``, or the expected
error was raised), ``FAIL`` (a difference above tolerance, a non-finite or missing item, or no
error where one was expected), ``ERROR`` (the case could not be loaded, the bridge is
unavailable, or the runner raised an unexpected error) or ``UNSUPPORTED`` (the runner's
``unsupported(case)`` capability check says it cannot run this kind of case yet; nothing is
run). Only ``PASS`` counts as a pass.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from metta_core.errors import MettaError

from bridges.conformance.cases import Case, CaseError, load_case
from bridges.conformance.reference import Measurement
from bridges.conformance.runners import BridgeUnavailable, load_runner

QUANTITIES = ("terms", "grads", "params_after_step", "phase_stats", "params_after_phase")
"""Compared quantities, in table order (the ``Measurement`` fields)."""

TOLERANCES = {"terms": 1e-6, "grads": 1e-6, "params_after_step": 1e-6, "phase_stats": 1e-5, "params_after_phase": 1e-5}
"""Largest accepted absolute difference per quantity."""

HEADERS = {"terms": "terms", "grads": "grads", "params_after_step": "step params", "phase_stats": "phase stats",
           "params_after_phase": "phase params"}


@dataclass
class Result:
    """One (case, framework) outcome; ``diffs[q]`` is None when ``q`` was not compared."""

    case: str
    framework: str
    status: str
    message: str = ""
    diffs: dict[str, float | None] = field(default_factory=lambda: {q: None for q in QUANTITIES})
    worst: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


def _max_diff(expected: Mapping[str, object], got: Mapping[str, object]) -> tuple[float, str, list[str]]:
    """``(max abs diff, worst item, problems)``; a missing, misshaped or non-finite item is a problem."""
    worst, worst_item, problems = 0.0, "", []
    for name, want in expected.items():
        if name not in got:
            problems.append(f"{name} not reported")
            continue
        want_a, got_a = np.asarray(want, dtype=np.float64), np.asarray(got[name], dtype=np.float64)
        if want_a.shape != got_a.shape:
            problems.append(f"{name} has shape {got_a.shape}, expected {want_a.shape}")
            continue
        if not np.isfinite(got_a).all():
            problems.append(f"{name} is not finite")
            continue
        diff = float(np.max(np.abs(want_a - got_a))) if want_a.size else 0.0
        if diff >= worst:
            worst, worst_item = diff, name
    return worst, worst_item, problems


def compare(case: Case, framework: str, got: Measurement, seconds: float = 0.0) -> Result:
    """Compare a runner's measurement with the case's expected values (see the module docstring)."""
    result = Result(case.name, framework, "PASS", seconds=seconds)
    problems = []
    for quantity in QUANTITIES:
        diff, item, issues = _max_diff(getattr(case.expected, quantity), getattr(got, quantity))
        result.diffs[quantity] = diff
        result.worst[quantity] = item
        problems += [f"{quantity}: {issue}" for issue in issues]
        if diff > TOLERANCES[quantity]:
            problems.append(f"{quantity}: max abs diff {diff:.3g} at {item!r} > {TOLERANCES[quantity]:g}")
    if problems:
        result.status, result.message = "FAIL", "; ".join(problems)
    return result


def run_one(case: Case, framework: str) -> Result:
    """Run ``case`` through ``framework``'s runner and compare; never raises for case or bridge problems."""
    started = time.perf_counter()
    try:
        runner = load_runner(framework)
    except BridgeUnavailable as exc:
        return Result(case.name, framework, "ERROR", f"error: {exc}")
    reason = getattr(runner, "unsupported", lambda _: None)(case)
    if reason:
        return Result(case.name, framework, "UNSUPPORTED", reason)
    try:
        got = runner.run(case)
    except MettaError as exc:
        seconds = time.perf_counter() - started
        if case.expected_error is not None and case.expected_error in str(exc):
            return Result(case.name, framework, "PASS", f"raised the expected error: {exc}", seconds=seconds)
        return Result(case.name, framework, "ERROR", f"error: {exc}", seconds=seconds)
    except Exception as exc:  # a crash in a framework is reported, and the run goes on
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return Result(case.name, framework, "ERROR",
                      f"error: {type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})",
                      seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if case.expected_error is not None:
        return Result(case.name, framework, "FAIL",
                      f"expected an error containing {case.expected_error!r}, the run succeeded", seconds=seconds)
    return compare(case, framework, got, seconds)


def run_cases(paths: Iterable[Path], frameworks: Iterable[str],
              progress: Callable[[str], None] | None = None) -> list[Result]:
    """Load each case (a load error becomes an ``ERROR`` row per framework) and run it through each framework.

    ``progress`` is called with ``"<case> / <framework>"`` after each result.
    """
    frameworks = list(frameworks)
    results = []
    for path in paths:
        try:
            case = load_case(path)
        except CaseError as exc:
            for framework in frameworks:
                results.append(Result(exc.case, framework, "ERROR", f"error: {exc}"))
                if progress:
                    progress(f"{exc.case} / {framework}")
            continue
        for framework in frameworks:
            results.append(run_one(case, framework))
            if progress:
                progress(f"{case.name} / {framework}")
    return results


def summary(results: list[Result]) -> dict[str, int]:
    counts = {"PASS": 0, "FAIL": 0, "ERROR": 0, "UNSUPPORTED": 0}
    for r in results:
        counts[r.status] += 1
    return {"total": len(results), **counts}


def _counts(s: dict[str, int]) -> str:
    """``"P passed, F failed, E errors[, U not supported yet] of N"``."""
    unsupported = f", {s['UNSUPPORTED']} not supported yet" if s["UNSUPPORTED"] else ""
    return f"{s['PASS']} passed, {s['FAIL']} failed, {s['ERROR']} errors{unsupported} of {s['total']}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def table(results: list[Result]) -> str:
    """Plain-text table: case x framework -> max abs diff per quantity and status; messages below it."""
    head = ["case", "framework", *(HEADERS[q] for q in QUANTITIES), "status"]
    rows = [[r.case, r.framework, *(_cell(r.diffs[q]) for q in QUANTITIES), r.status] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{r.case} / {r.framework}: {r.message}" for r in results if r.message and not r.passed]
    tol = ", ".join(f"{HEADERS[q]} {TOLERANCES[q]:g}" for q in QUANTITIES)
    s = summary(results)
    lines += ["", f"tolerances: {tol}", _counts(s)]
    return "\n".join(lines + ([""] + notes if notes else []))


def to_json(results: list[Result]) -> dict:
    return {"tolerances": TOLERANCES, "summary": summary(results), "results": [asdict(r) for r in results]}


def markdown(results: list[Result], title: str = "Conformance report") -> str:
    """A Markdown report: the table, the tolerances and every non-pass message."""
    head = ["case", "framework", *(HEADERS[q] for q in QUANTITIES), "status"]
    lines = [f"# {title}", "",
             "Max absolute difference to the expected values of `bridges.conformance.reference` "
             "(SPEC §1-§4, §6), per case and framework. Regenerate with "
             "`metta-bridges conformance --all --markdown docs/conformance.md`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([r.case, r.framework, *(_cell(r.diffs[q]) for q in QUANTITIES),
                                        f"**{r.status}**" if not r.passed else r.status]) + " |")
    s = summary(results)
    lines += ["", "Tolerances: " + ", ".join(f"{HEADERS[q]} {TOLERANCES[q]:g}" for q in QUANTITIES) + ".",
              "", f"{_counts(s)}."]
    pending: dict[str, list[str]] = {}
    for r in results:
        if r.status == "UNSUPPORTED":
            pending.setdefault(r.framework, []).append(f"`{r.case}`")
    if pending:
        lines += ["", "Not supported by the framework's runner yet (pending): "
                  + "; ".join(f"{framework}: {', '.join(names)}" for framework, names in pending.items()) + "."]
    notes = [f"- `{r.case}` / {r.framework}: {r.message}" for r in results if r.message]
    if notes:
        lines += ["", "## Messages", "", *notes]
    return "\n".join(lines) + "\n"


def heatmap(results: list[Result], path: Path) -> Path:
    """PNG heatmap of ``log10(max abs diff / tolerance)`` per (case / framework, quantity).

    Cells at or below 0 are within tolerance; rows without numbers are grey: ``ERR`` for errors,
    ``raised`` for a case whose expected error was raised, ``n/s`` for a case the runner does not
    support yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.case} / {r.framework}" for r in results]
    grid = np.full((len(results), len(QUANTITIES)), np.nan)
    for i, r in enumerate(results):
        for j, q in enumerate(QUANTITIES):
            d = r.diffs[q]
            if d is not None:
                grid[i, j] = math.log10(max(d, 1e-12) / TOLERANCES[q])
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * max(1, len(results))))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-6, vmax=2, aspect="auto")
    for i, r in enumerate(results):
        for j, q in enumerate(QUANTITIES):
            if r.diffs[q] is not None:
                text = f"{r.diffs[q]:.0e}"
            else:
                text = {"ERROR": "ERR", "PASS": "raised", "UNSUPPORTED": "n/s"}.get(r.status, "-")
            ax.text(j, i, text, ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(QUANTITIES)), [HEADERS[q] for q in QUANTITIES], fontsize=7)
    ax.set_yticks(range(len(results)), labels, fontsize=6)
    fig.colorbar(image, ax=ax, label="log10(max abs diff / tolerance)")
    ax.set_title("metta-bridges conformance", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(results: list[Result], *, json_path: Path | None, markdown_path: Path | None,
                  heatmap_path: Path | None) -> list[Path]:
    """Write the requested reports; return the written paths."""
    written = []
    for path, text in ((json_path, lambda: json.dumps(to_json(results), indent=1) + "\n"),
                       (markdown_path, lambda: markdown(results))):
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())
            written.append(path)
    if heatmap_path is not None:
        written.append(heatmap(results, heatmap_path))
    return written
