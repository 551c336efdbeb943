#!/usr/bin/env python
"""
Linear probing of a frozen MATPAC encoder (or any `AutoModel` with a `pooler_output`) on the MATPAC paper's seven
downstream tasks, following the paper's protocol: see `modeling_matpac/evaluation/probe.py` for the protocol and the
validation rule, `modeling_matpac/evaluation/tasks.py` for the tasks and their expected data layouts.

    python run_probe.py --dataset esc50 --data_dir /data/ESC-50-master
    python run_probe.py --dataset gtzan                    # the Hub copy of GTZAN
    python run_probe.py --all --data_dir /data             # every task found under /data/<task>/
    python run_probe.py --dataset audiofolder --data_dir /data/my_sounds --save_head outputs/my-classifier

Each split's clip count is checked against the complete dataset's (a partly extracted copy fails unless
`--allow_incomplete` is given); the results table shows the counts used, and the tasks `--all` skipped, with why.

Embeddings are cached under `--cache_dir`, so re-running with other probe hyper-parameters re-encodes nothing; a long
extraction is saved every 10,000 clips, so a stopped run resumes where it was. With `--all`, the results are written
after each task (the tasks still to probe listed as pending): a run that fails or is stopped keeps what it finished.
"""

import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from modeling_matpac.cpu_memory import keep_freed_memory_mapped
from modeling_matpac.evaluation.embeddings import EmbeddingExtractor, load_or_extract, parse_layer
from modeling_matpac.evaluation.probe import (
    ProbeSettings,
    check_classifier_encoder,
    check_head_folder,
    evaluate,
    save_classifier,
)
from modeling_matpac.evaluation.report import TaskResult, results_markdown, task_result, write_results
from modeling_matpac.evaluation.tasks import (
    PAPER_TASKS,
    TASKS,
    ProbeDataError,
    check_clip_counts,
    find_task_dir,
    get_task,
    load_task,
)
from modeling_matpac.script_exit import close_progress_bars


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="outputs/matpac-default",
        metadata={
            "help": "A saved or converted MATPAC directory (or any AutoModel whose outputs have pooler_output)."
        },
    )
    layer: str = field(
        default="last",
        metadata={"help": "Embedding to probe: 'last' (the paper's), a block number from 1, or 'all' (their mean)."},
    )
    extraction_batch_size: int = field(default=8, metadata={"help": "Clips encoded per forward pass."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Processes decoding audio during extraction."})

    def __post_init__(self):
        if self.extraction_batch_size < 1:
            raise ValueError(f"extraction_batch_size must be at least 1, got {self.extraction_batch_size}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be at least 0, got {self.dataloader_num_workers}.")


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "Task to probe.", "choices": list(TASKS)})
    all: bool = field(default=False, metadata={"help": "Probe every paper task whose data is found."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "The dataset in its original layout (with --all: a folder holding one folder per task). "
            "Without it, tasks are read from their Hub copy."
        },
    )
    hub_dataset: str | None = field(
        default=None,
        metadata={"help": "Another Hub repo id (or local folder) with the layout of the task's Hub copy."},
    )
    allow_incomplete: bool = field(
        default=False,
        metadata={
            "help": "Probe a task whose splits have fewer (or more) clips than the complete dataset instead of "
            "failing; the results table says so."
        },
    )
    output_dir: str = field(default="outputs/probe", metadata={"help": "Where results.json and results.md go."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Embedding cache (default: <output_dir>/embeddings)."}
    )
    save_head: str | None = field(
        default=None,
        metadata={
            "help": "Save the first run's probe with the encoder as a MatpacForAudioClassification directory here "
            "(with --all, one sub-folder per task)."
        },
    )


def load_data(name: str, data_args: DataArguments):
    """The task's data: from `--data_dir` (with `--all`, its task folder there), else from its Hub copy."""
    if data_args.all and data_args.data_dir is not None:
        task_dir = find_task_dir(name, data_args.data_dir)
        if task_dir is None:
            raise ProbeDataError(f"no {' or '.join(get_task(name).folder_names)} folder in {data_args.data_dir}")
        return load_task(name, task_dir)
    return load_task(name, data_args.data_dir, data_args.hub_dataset)


def check_writable_folder(flag: str, folder: Path) -> None:
    """`folder`, or the nearest of its parents that exists, must be a folder this process can write to."""
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        reason = "is a file" if existing == folder else f"is inside {existing}, a file"
        raise ValueError(f"{flag} {str(folder)!r} {reason}, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(folder)!r}: {existing} is not writable.")


def head_folder(data_args: DataArguments, task: str) -> Path:
    """Where `--save_head` puts a task's probe: the folder itself, or with `--all` a folder per task inside it."""
    return Path(data_args.save_head) / task if data_args.all else Path(data_args.save_head)


def run(model_args: ModelArguments, data_args: DataArguments, settings: ProbeSettings) -> list[TaskResult]:
    if data_args.all == (data_args.dataset is not None):
        raise ValueError("Pass either --dataset NAME or --all.")
    if data_args.all and data_args.hub_dataset:
        raise ValueError("--hub_dataset names one task's data: use it with --dataset, not --all.")
    if data_args.data_dir and data_args.hub_dataset:
        raise ValueError("--data_dir and --hub_dataset both name the task's data: pass one of them.")
    folders = {
        "--output_dir": data_args.output_dir,
        "--cache_dir": data_args.cache_dir,
        "--save_head": data_args.save_head,
    }
    for flag, folder in folders.items():  # checked first: the heads and the results are written after the work
        if folder is not None:
            check_writable_folder(flag, Path(folder))
    layer = parse_layer(model_args.layer)
    tasks = list(PAPER_TASKS) if data_args.all else [data_args.dataset]
    if data_args.save_head:
        if layer != "last":
            raise ValueError("--save_head puts the probe on pooler_output (the last layer): leave --layer at 'last'.")
        for name in tasks:
            check_head_folder(head_folder(data_args, name), model_args.model_name_or_path)

    extractor = EmbeddingExtractor(
        model_args.model_name_or_path,
        layer=layer,
        device=settings.device,
        batch_size=model_args.extraction_batch_size,
        num_workers=model_args.dataloader_num_workers,
    )
    settings.device = str(extractor.device)
    if data_args.save_head:
        check_classifier_encoder(extractor.model)
    if extractor.device.type == "cpu" and keep_freed_memory_mapped():
        logger.info("On CPU: malloc keeps freed memory for the next batches (modeling_matpac/cpu_memory.py).")
    cache_dir = data_args.cache_dir or str(Path(data_args.output_dir) / "embeddings")
    run_settings = {"model": asdict(model_args), "data": asdict(data_args), "probe": asdict(settings)}
    results, skipped = [], {}
    for index, name in enumerate(tasks):
        try:
            data = load_data(name, data_args)
            check_clip_counts(data, data_args.allow_incomplete)
            logger.info("%s: %d clips from %s", name, len(data), data.source)
            embeddings = load_or_extract(data, extractor, cache_dir)
            if len(embeddings.positions) < len(data):  # undecodable clips were dropped while encoding
                check_clip_counts(data.select(embeddings.positions), data_args.allow_incomplete)
            data = data.select(embeddings.positions)
            outcome = evaluate(data, embeddings.values, settings)
        except ProbeDataError as error:
            if not data_args.all:
                raise
            skipped[name] = str(error).splitlines()[0]
            logger.warning("%s: skipped, %s", name, skipped[name])
            continue
        results.append(task_result(data, outcome, embeddings, paper=get_task(name).paper_score))
        # Written before the head is saved and after each task: what is done stays if a later step fails or stops.
        pending = tasks[index + 1 :]
        write_results(results, data_args.output_dir, run_settings, skipped, pending)
        if pending:
            logger.info("%s: results so far written to %s (%d tasks to go)", name, data_args.output_dir, len(pending))
        if data_args.save_head:
            directory = head_folder(data_args, name)
            result = results[-1]
            split = outcome.first_split.replace("fold", "fold ") if data.fold is not None else "the test split"
            score = (
                f"{result.metric} {result.fold_scores[0][0]:.2f} % on {split} (this probe, the first of the run); the "
                f"protocol's mean over {len(result.runs)} runs x {result.num_folds} split(s): {result.mean:.2f} "
                f"± {result.ci95:.2f} % on {result.num_clips} clips."
            )
            card = (model_args.model_name_or_path, get_task(name).title, score)
            save_classifier(
                extractor.model, extractor.feature_extractor, outcome.first_probe, data.classes, directory, card
            )
            logger.info("%s: saved the probe as an audio classifier in %s", name, directory)
    if not results:
        where = f"in {data_args.data_dir}" if data_args.data_dir else "on the Hub, and no --data_dir was given"
        raise ProbeDataError(
            f"No task could be probed: no usable task data {where} (the warnings above say why for each). --data_dir "
            "takes the folder that holds the tasks' folders (the README lists their names)."
        )
    json_path, markdown_path = write_results(results, data_args.output_dir, run_settings, skipped)

    print(results_markdown(results, skipped))
    logger.info("Results written to %s and %s", json_path, markdown_path)
    return results


def main(argv: list[str] | None = None) -> list[TaskResult]:
    parser = HfArgumentParser((ModelArguments, DataArguments, ProbeSettings))
    try:
        model_args, data_args, settings = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # flags no dataclass has: an argument error, like a bad value
        parser.error(str(error))
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO,
    )
    try:
        return run(model_args, data_args, settings)
    except (ProbeDataError, ValueError) as error:
        close_progress_bars()
        sys.exit(f"run_probe.py: error: {error}")


if __name__ == "__main__":
    main()
