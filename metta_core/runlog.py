"""What a training run shows and leaves behind: a progress bar, a metrics file, a learning curve.

Shared by every framework's ``train`` so that ``metta-bridges train --framework X`` looks and
records the same way whatever runs underneath. No math lives here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from metta_core.errors import MettaError

METRICS_FORMATS = ("jsonl", "csv")
RETURN_KEY = "episode_return_mean"
STEPS_KEY = "env_steps"
REWARD_RATE_KEY = "reward_per_agent_step"
CURVE_LABELS = {RETURN_KEY: ("env steps", "mean episodic return"), REWARD_RATE_KEY: ("agent steps", "mean reward per agent-step")}
"""Axis labels of the learning curve for each metric it can plot."""
BAR_KEYS = (RETURN_KEY, REWARD_RATE_KEY, "policy_loss", "value_loss", "entropy", "approx_kl")
BAR_NAMES = {RETURN_KEY: "return", REWARD_RATE_KEY: "reward/step"}


class RunLogger:
    """Append one row of metrics per training iteration and keep a progress bar current.

    ``out_dir/metrics.jsonl`` (or ``.csv``) gets one row per ``log`` call; ``close`` draws
    ``out_dir/learning_curve.png`` (``curve_key`` against env steps: the mean episodic return, or
    for multi-agent envs the mean reward per agent-step) from that file, so a resumed run
    (``resume=True`` appends) plots its whole history.
    """

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        *,
        metrics_format: str = "jsonl",
        progress: bool = True,
        resume: bool = False,
        title: str = "",
        curve_key: str = RETURN_KEY,
    ) -> None:
        if metrics_format not in METRICS_FORMATS:
            raise MettaError(f"metrics_format must be one of {METRICS_FORMATS}, got {metrics_format!r}")
        if curve_key not in CURVE_LABELS:
            raise MettaError(f"curve_key must be one of {sorted(CURVE_LABELS)}, got {curve_key!r}")
        self.curve_key = curve_key
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / f"metrics.{metrics_format}"
        self.curve_path = self.out_dir / "learning_curve.png"
        self.format = metrics_format
        self.title = title
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        self._columns: list[str] | None = self._csv_header() if resume else None
        start = self._last_step() if resume else 0
        self._bar = tqdm(total=total_steps, initial=start, unit="step", disable=not progress, dynamic_ncols=True)
        self._bar.set_description(title or "train")

    def log(self, metrics: Mapping[str, float]) -> None:
        """Record one iteration; ``metrics`` must hold ``env_steps`` (cumulative)."""
        if STEPS_KEY not in metrics:
            raise MettaError(f"RunLogger.log: metrics must include {STEPS_KEY!r}, got keys {sorted(metrics)}")
        row = {k: float(v) for k, v in metrics.items()}
        if self.format == "jsonl":
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            if self._columns is None:
                self._columns = list(row)
                with self.metrics_path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._columns)
            with self.metrics_path.open("a", newline="") as f:
                csv.writer(f).writerow([row.get(c, "") for c in self._columns])
        self._bar.update(max(0, int(row[STEPS_KEY]) - self._bar.n))
        self._bar.set_postfix(
            {BAR_NAMES.get(k, k): f"{row[k]:.3g}" for k in BAR_KEYS if k in row},
            refresh=False,
        )

    def rows(self) -> list[dict[str, float]]:
        """All rows recorded so far (including those of runs this one resumed)."""
        if not self.metrics_path.exists():
            return []
        if self.format == "jsonl":
            return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        with self.metrics_path.open(newline="") as f:
            return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]

    def close(self) -> Path:
        """Close the bar and write the learning-curve PNG; returns its path."""
        self._bar.close()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = self.curve_key
        points = [(r[STEPS_KEY], r[key]) for r in self.rows() if not math.isnan(r.get(key, math.nan))]
        fig, ax = plt.subplots(figsize=(6, 4))
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys)
        xlabel, ylabel = CURVE_LABELS[key]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(self.title or "learning curve")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.curve_path, dpi=100)
        plt.close(fig)
        return self.curve_path

    def _csv_header(self) -> list[str] | None:
        if self.format != "csv" or not self.metrics_path.exists():
            return None
        with self.metrics_path.open(newline="") as f:
            return next(csv.reader(f), None)

    def _last_step(self) -> int:
        rows = self.rows()
        return int(rows[-1][STEPS_KEY]) if rows else 0
