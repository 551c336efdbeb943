"""The results of a probing run: one row per task beside the paper's Table II, as JSON and as a Markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic_write import replace_when_written
from .embeddings import Embeddings
from .probe import ProbeOutcome, confidence_interval
from .tasks import TASKS, ProbeData, clip_counts


@dataclass
class TaskResult:
    """One row of the results table; scores in %."""

    task: str
    metric: str
    mean: float
    ci95: float
    runs: list[float]
    num_folds: int
    num_clips: int
    embedding_dim: int
    extraction_seconds: float
    extraction_cached: bool
    probe_seconds: float
    paper: float | None = None
    fold_scores: list[list[float]] = field(default_factory=list)
    clips_per_split: dict[str, int] = field(default_factory=dict)
    complete: bool | None = None  # whether every split has the complete dataset's clips; None: sizes not published


def task_result(data: ProbeData, outcome: ProbeOutcome, embeddings: Embeddings, paper: float | None) -> TaskResult:
    """The table row of a task; `data` holds the clips that were embedded."""
    runs = [100 * value for value in outcome.run_scores]
    counts = clip_counts(data)
    expected = TASKS[data.task].expected_clips if data.task in TASKS else {}
    return TaskResult(
        task=data.task,
        metric="mAP" if data.multi_label else "accuracy",
        mean=float(np.mean(runs)),
        ci95=100 * confidence_interval(outcome.run_scores),
        runs=runs,
        num_folds=len(outcome.fold_scores[0]),
        num_clips=len(data),
        embedding_dim=embeddings.values.shape[1],
        extraction_seconds=embeddings.seconds,
        extraction_cached=embeddings.cached,
        probe_seconds=outcome.seconds,
        paper=paper,
        fold_scores=[[100 * value for value in run] for run in outcome.fold_scores],
        clips_per_split={f"fold {name}" if isinstance(name, int) else name: count for name, count in counts.items()},
        complete=counts == expected if expected else None,
    )


def results_markdown(
    results: list[TaskResult], skipped: dict[str, str] | None = None, pending: list[str] | None = None
) -> str:
    """
    The results table; tasks in `skipped` (task -> reason) get a row that says why they have no score, and those in
    `pending` a row that says they are not probed yet.
    """
    header = (
        "Task",
        "Metric",
        "Ours (mean ± 95% CI)",
        "Paper (MATPAC)",
        "Runs",
        "Folds",
        "Clips",
        "Dim",
        "Extraction (s)",
        "Probe (s)",
        "Clips per split",
        "Complete",
    )
    rows = [header, ("---",) * len(header)]
    for result in results:
        rows.append(
            (
                result.task,
                result.metric,
                f"{result.mean:.2f} ± {result.ci95:.2f}",
                "-" if result.paper is None else f"{result.paper:.1f}",
                len(result.runs),
                result.num_folds,
                result.num_clips,
                result.embedding_dim,
                f"{result.extraction_seconds:.1f}" + (" (cached)" if result.extraction_cached else ""),
                f"{result.probe_seconds:.1f}",
                " / ".join(f"{name}: {count:,}" for name, count in result.clips_per_split.items()),
                {True: "yes", False: "no", None: "-"}[result.complete],
            )
        )
    statuses = [(task, f"skipped: {reason}") for task, reason in (skipped or {}).items()]
    statuses += [(task, "pending: not probed yet") for task in pending or []]
    for task, status in statuses:
        paper = TASKS[task].paper_score
        row = (task, "-", status, "-" if paper is None else f"{paper:.1f}")
        rows.append(row + ("-",) * (len(header) - len(row)))
    return "\n".join("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)


def write_results(
    results: list[TaskResult],
    output_dir: str | Path,
    settings: dict,
    skipped: dict[str, str] | None = None,
    pending: list[str] | None = None,
) -> tuple[Path, Path]:
    """
    Writes `results.json` (rows, skipped tasks, tasks still to probe and the run's settings) and `results.md` (the
    table), each through a temporary file, so that a run stopped while writing keeps the previous complete version.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = output_dir / "results.json", output_dir / "results.md"
    content = {
        "settings": settings,
        "results": [asdict(r) for r in results],
        "skipped": skipped or {},
        "pending": pending or [],
    }
    for path, text in (
        (json_path, json.dumps(content, indent=2)),
        (markdown_path, results_markdown(results, skipped, pending)),
    ):
        with replace_when_written(path) as partial:
            partial.write_text(text + "\n")
    return json_path, markdown_path
