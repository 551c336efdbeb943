#!/usr/bin/env python
"""
Pre-trains MATPAC on audio with `MatpacTrainer`, on one device or many (`accelerate launch run_pretraining.py ...`).

Without a data source (`python run_pretraining.py`) it trains a small MATPAC for a few minutes on a built-in synthetic
corpus, generated on the fly, and saves a model that `AutoModel.from_pretrained` and `run_probe.py` can use. With a
source, the defaults are the paper's best recipe (ViT-B, 300 epochs, batch 2048 = 8 x 256, AdamW 3e-4 with weight
decay on every parameter, cosine with 20 warm-up epochs, clipping 3.0, teacher temperature warm-up over 10 epochs),
converted to steps from the number of clips; the run logs its effective recipe and warns where it departs from the
paper's. On 8 GPUs, AudioSet's balanced and unbalanced training sets (1,757,473 clips on the Hub):

    accelerate launch --config_file configs/accelerate_ddp_bf16.yaml run_pretraining.py \
        --dataset_name agkphysics/AudioSet --dataset_config_name full --dataset_split bal_train+unbal_train \
        --dataset_size 1757473 --dataloader_num_workers 8
    python run_pretraining.py --train_dir /data/my_audio --num_train_epochs 100

`--predictor_num_hypotheses 5` trains MATPAC++ instead (five multiple-choice prediction heads, the authors' best
model), with any data source or the built-in corpus.

`--preprocess_to DIR` decodes, resamples and computes the log-mels of the audio source once, stores them in DIR and
exits (a stopped build resumes after its last finished shard when run again); `--train_cache DIR` then trains on
random crops of them, without decoding any audio:

    python run_pretraining.py --train_dir /data/my_audio --preprocess_to /data/logmels --preprocessing_num_workers 16
    python run_pretraining.py --train_cache /data/logmels --num_train_epochs 100
"""

import contextlib
import datetime
import logging
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import datasets
import torch
import transformers
from safetensors import SafetensorError
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from modeling_matpac import MatpacConfig, MatpacFeatureExtractor, MatpacForPreTraining
from modeling_matpac.cpu_memory import keep_freed_memory_mapped
from modeling_matpac.pretraining import (
    BatchTooLargeError,
    MatpacLogMelCacheDataset,
    MatpacPretrainingDataset,
    MatpacTrainer,
    NonFiniteTrainingError,
    collate_pretraining_batch,
    generate_builtin_corpus,
    load_audio_source,
    preprocess_to_cache,
)
from modeling_matpac.pretraining.checkpoints import checkpoint_problem, checkpoint_steps, last_complete_checkpoint
from modeling_matpac.pretraining.data import (
    DEFAULT_SHUFFLE_BUFFER_SIZE,
    SKIP_COUNTERS,
    AudioSource,
    NoUsableClipError,
)
from modeling_matpac.pretraining.trainer import WEIGHT_DECAY_SETS, check_supported_arguments
from modeling_matpac.script_exit import close_progress_bars, stop_worker_processes


try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "TEMPLATE.md"
BUILTIN_CORPUS_DIR = "builtin_corpus"
DATA_SOURCE_FLAGS = ("--dataset_name", "--train_dir", "--train_files", "--train_cache")
PAPER_GLOBAL_BATCH = 2048  # 8 GPUs x 256 clips
# The built-in default: a small model and a short schedule that run in a few minutes on a laptop CPU. Prepended to
# the command line when no data source is given, so that any flag the user passes still wins; the small model only
# for a fresh one (a --model_name_or_path brings its own config).
BUILTIN_MODEL_FLAGS = [
    "--config_overrides",
    "hidden_size=192,num_hidden_layers=4,num_attention_heads=3,intermediate_size=768,"
    "predictor_hidden_size=96,predictor_num_hidden_layers=2,predictor_num_attention_heads=3,"
    "predictor_intermediate_size=384,head_hidden_size=256,head_bottleneck_size=64,head_num_prototypes=256,"
    "ema_decay=0.99,ema_end_decay=0.999,head_ema_decay=0.99",
]
BUILTIN_DEFAULT_FLAGS = [
    "--per_device_train_batch_size", "16",
    "--max_steps", "600",
    "--learning_rate", "1e-3",
    "--warmup_steps", "60",
    "--teacher_temperature_warmup_steps", "200",
    "--logging_steps", "50",
    "--save_steps", "200",
    "--save_total_limit", "1",
]  # fmt: skip


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A MatpacForPreTraining checkpoint to continue from, or a MatpacModel (student encoder) to start "
            "from; a fresh model when not given."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to change for a fresh model, e.g. 'hidden_size=384,num_attention_heads=6'."},
    )
    predictor_num_hypotheses: int | None = field(
        default=None,
        metadata={
            "help": "Prediction heads: 5 trains MATPAC++ (multiple-choice heads), 1 MATPAC (a fresh model's default). "
            "With --model_name_or_path, heads the checkpoint lacks start fresh."
        },
    )
    teacher_temperature_warmup_epochs: float = field(
        default=10.0, metadata={"help": "Epochs of the teacher temperature warm-up (n_tau; 10 in the best model)."}
    )
    teacher_temperature_warmup_steps: int | None = field(
        default=None, metadata={"help": "The warm-up in optimizer steps; wins over the epochs."}
    )

    def __post_init__(self):
        if not 0 <= self.teacher_temperature_warmup_epochs < math.inf:
            raise ValueError(
                "--teacher_temperature_warmup_epochs must be at least 0 and finite, got "
                f"{self.teacher_temperature_warmup_epochs:g}."
            )
        if self.teacher_temperature_warmup_steps is not None and self.teacher_temperature_warmup_steps < 0:
            raise ValueError(
                f"--teacher_temperature_warmup_steps must be at least 0, got {self.teacher_temperature_warmup_steps}."
            )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub audio dataset, e.g. an AudioSet mirror."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    dataset_split: str = field(
        default="train",
        metadata={"help": "The split to train on; 'a+b' concatenates splits (e.g. bal_train+unbal_train)."},
    )
    dataset_size: int | None = field(
        default=None,
        metadata={
            "help": "Clips per epoch, to convert epochs to steps; wins over the count the source declares (a Hub "
            "card's count includes clips shorter than a crop, which training skips)."
        },
    )
    shuffle_buffer_size: int = field(
        default=DEFAULT_SHUFFLE_BUFFER_SIZE,
        metadata={
            "help": "Clips in each DataLoader worker's shuffle buffer of a streamed source (encoded clips in memory: "
            "about 1 GB at 1000 for AudioSet's 10 s FLAC); a log-mel cache or a folder is shuffled fully instead."
        },
    )
    streaming: bool = field(
        default=True, metadata={"help": "Stream the Hub dataset (or local shards with --train_files)."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "A local folder of audio files (searched recursively)."}
    )
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local parquet or webdataset (.tar) shards: files, folders or glob patterns."}
    )
    audio_column: str | None = field(default=None, metadata={"help": "The dataset's audio column."})
    builtin_corpus_clips: int = field(
        default=96, metadata={"help": "Clips of the built-in corpus, used when no data source is given."}
    )
    train_cache: str | None = field(
        default=None,
        metadata={
            "help": "A log-mel cache written by --preprocess_to: trains on random crops of its pre-computed log-mels, "
            "without decoding audio. It must have been computed with the model's front end."
        },
    )
    preprocess_to: str | None = field(
        default=None,
        metadata={
            "help": "Decode, resample and compute the log-mels of the audio source (the built-in corpus if none is "
            "given) once, write them to this folder as a log-mel cache and exit; then train with --train_cache."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that decode audio for --preprocess_to (default: this one only)."}
    )
    preprocess_shard_size: int = field(default=1024, metadata={"help": "Clips per file of the --preprocess_to cache."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Let --preprocess_to replace an existing cache."})


@dataclass
class MatpacTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults."""

    output_dir: str = field(default="outputs/matpac-default", metadata={"help": "Where checkpoints and the model go."})
    per_device_train_batch_size: int = field(
        default=256,
        metadata={
            "help": "Clips per device and micro-batch (the paper: 8 GPUs x 256 = 2048; 16 for the built-in corpus)."
        },
    )
    learning_rate: float = field(
        default=3e-4, metadata={"help": "Peak learning rate of AdamW (the paper's; 1e-3 for the built-in corpus)."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW's beta2 (the paper's)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW's epsilon (the paper's)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW's weight decay (the paper's)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the warm-up (the paper's cosine)."}
    )
    max_grad_norm: float = field(default=3.0, metadata={"help": "Gradient-norm clipping (the paper's 3.0)."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "The Trainer's optimizer name."})
    num_train_epochs: float = field(
        default=300.0,
        metadata={
            "help": "Epochs, converted to steps from the clip count; --max_steps wins (the built-in corpus: "
            "--max_steps 600)."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder of this run to continue, or 'last': the last complete checkpoint of "
            "--output_dir."
        },
    )
    warmup_epochs: float = field(
        default=20.0, metadata={"help": "Learning-rate warm-up in epochs; --warmup_steps wins when given."}
    )
    weight_decay_set: str = field(
        default="all",
        metadata={
            "help": "Parameters that get weight decay: 'all' (the authors' Adam) or 'transformers' (the Trainer's "
            "set: no decay on biases and LayerNorm weights).",
            "choices": list(WEIGHT_DECAY_SETS),
        },
    )
    logging_steps: float = field(default=50, metadata={"help": "Log every this many optimizer steps."})
    save_steps: float = field(default=5000, metadata={"help": "Save a checkpoint every this many optimizer steps."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an --output_dir that holds another run's files: its checkpoints are deleted "
            "first. Without it, such a folder is refused unless --resume_from_checkpoint continues the run."
        },
    )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, MatpacTrainingArguments, bool]:
    """
    Parses the command line; without a data source, on the built-in defaults, which any flag given overrides. What
    was given is read from a first parse, so that every spelling argparse takes (`--train-dir`, an abbreviation)
    counts.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, MatpacTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    builtin = all(getattr(data_args, flag.removeprefix("--")) is None for flag in DATA_SOURCE_FLAGS)
    if builtin:
        fresh_model = model_args.model_name_or_path is None
        argv = (BUILTIN_MODEL_FLAGS if fresh_model else []) + BUILTIN_DEFAULT_FLAGS + argv
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    # --warmup_steps wins when given, 0 (no warm-up) included, which is also its default: ask the parser. A
    # --warmup_epochs that is not a number of epochs is left for the flag checks to refuse.
    parser.set_defaults(warmup_steps=None)
    if parser.parse_known_args(argv)[0].warmup_steps is not None and 0 <= training_args.warmup_epochs < math.inf:
        training_args.warmup_epochs = 0.0
    return model_args, data_args, training_args, builtin


def parse_config_value(name: str, value: str, default: object) -> object:
    """A `--config_overrides` value with the type of the field's default."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"--config_overrides: {name} takes true or false, got {value!r}.")
        return value.lower() == "true"
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"--config_overrides: {name} expects {type(default).__name__}, got {value!r}.") from None


def build_config(model_args: ModelArguments) -> MatpacConfig:
    config = MatpacConfig()
    typed = {}
    if model_args.config_overrides:
        items = model_args.config_overrides.split(",")
        malformed = [item for item in items if "=" not in item]
        if malformed:
            raise ValueError(f"--config_overrides takes name=value items separated by commas, got {malformed}.")
        overrides = dict(item.split("=", 1) for item in items)
        unknown = sorted(name for name in overrides if not hasattr(config, name))
        if unknown:
            raise ValueError(f"--config_overrides names fields MatpacConfig does not have: {unknown}")
        typed = {name: parse_config_value(name, value, getattr(config, name)) for name, value in overrides.items()}
    if model_args.predictor_num_hypotheses is not None:
        typed["predictor_num_hypotheses"] = model_args.predictor_num_hypotheses
    return MatpacConfig(**{**config.to_diff_dict(), **typed}) if typed else config


def _not_loadable(model_args: ModelArguments, error: Exception | str) -> ValueError:
    return ValueError(
        f"--model_name_or_path {model_args.model_name_or_path!r} is not a model folder or a Hub model that can be "
        f"loaded: {str(error).strip().splitlines()[0]}"
    )


def _check_model_folder(model_args: ModelArguments) -> None:
    """A local folder without config.json would load as a default ViT-B config, not as the model it is meant to be."""
    folder = Path(model_args.model_name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise _not_loadable(model_args, "the folder has no config.json")


def load_config(model_args: ModelArguments) -> MatpacConfig:
    """The config of the model to train: from --model_name_or_path, else a fresh one with --config_overrides."""
    if model_args.model_name_or_path is None:
        return build_config(model_args)
    _check_model_folder(model_args)
    try:
        return MatpacConfig.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise _not_loadable(model_args, error) from None


def load_model(model_args: ModelArguments) -> MatpacForPreTraining:
    if model_args.model_name_or_path is None:
        return MatpacForPreTraining(build_config(model_args))
    if model_args.config_overrides:
        raise ValueError("--config_overrides applies to a fresh model, not to --model_name_or_path.")
    overrides = {}
    if model_args.predictor_num_hypotheses is not None:
        overrides["predictor_num_hypotheses"] = model_args.predictor_num_hypotheses
    _check_model_folder(model_args)
    try:
        return MatpacForPreTraining.from_pretrained(model_args.model_name_or_path, dtype=torch.float32, **overrides)
    except (OSError, SafetensorError) as error:
        raise _not_loadable(model_args, error) from None


def resolve_schedules(
    model_args: ModelArguments, training_args: MatpacTrainingArguments, config: MatpacConfig, dataset_size: int | None
) -> None:
    """Turns the recipe's epochs into optimizer steps, or asks for steps when the dataset size is unknown."""
    steps_per_epoch = math.ceil(dataset_size / global_batch_size(training_args)) if dataset_size else None
    if training_args.max_steps == -1:
        if steps_per_epoch is None:
            raise ValueError(
                "The dataset's size is unknown (a stream without a declared size): give the schedule in steps with "
                "--max_steps, --warmup_steps and --teacher_temperature_warmup_steps."
            )
        training_args.max_steps = math.ceil(training_args.num_train_epochs * steps_per_epoch)
    if training_args.warmup_steps == 0 and training_args.warmup_epochs > 0:
        if steps_per_epoch is None:
            raise ValueError("--warmup_epochs needs a dataset of known size: give --warmup_steps instead.")
        training_args.warmup_steps = round(training_args.warmup_epochs * steps_per_epoch)
    if model_args.teacher_temperature_warmup_steps is not None:
        config.teacher_temperature_warmup_steps = model_args.teacher_temperature_warmup_steps
    elif steps_per_epoch is not None:
        config.teacher_temperature_warmup_steps = round(model_args.teacher_temperature_warmup_epochs * steps_per_epoch)
    else:
        raise ValueError("--teacher_temperature_warmup_epochs needs a dataset of known size: give the steps instead.")


def global_batch_size(training_args: MatpacTrainingArguments) -> int:
    return (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )


def log_recipe(
    training_args: MatpacTrainingArguments,
    config: MatpacConfig,
    dataset_size: int | None,
    device_type: str,
    check_paper: bool = True,
) -> None:
    """Logs the run's effective recipe, then warns where it departs from the paper's in a way that changes results."""
    global_batch = global_batch_size(training_args)
    steps_per_epoch = math.ceil(dataset_size / global_batch) if dataset_size else None

    def in_epochs(steps: int) -> str:
        return f" ({steps / steps_per_epoch:.2f} epochs)" if steps_per_epoch else ""

    precision = {"no": "fp32"}.get(training_args.mixed_precision, training_args.mixed_precision)
    logger.info(
        "Recipe: global batch %d = %d per device x %d processes x %d accumulation steps; %s on %s; %d DataLoader "
        "workers per process; %d steps%s of %s clips per epoch (%s steps per epoch); learning-rate warm-up %d "
        "steps%s; teacher temperature warm-up %d steps%s; weight decay %g on %s parameters.",
        global_batch,
        training_args.per_device_train_batch_size,
        training_args.world_size,
        training_args.gradient_accumulation_steps,
        precision,
        device_type,
        training_args.dataloader_num_workers,
        training_args.max_steps,
        in_epochs(training_args.max_steps),
        f"{dataset_size:,}" if dataset_size else "an unknown number of",
        steps_per_epoch or "unknown",
        training_args.warmup_steps,
        in_epochs(training_args.warmup_steps),
        config.teacher_temperature_warmup_steps,
        in_epochs(config.teacher_temperature_warmup_steps),
        training_args.weight_decay,
        "all" if training_args.weight_decay_set == "all" else "all but bias and LayerNorm",
    )
    if not check_paper:
        return
    deviations = []
    if global_batch != PAPER_GLOBAL_BATCH:
        deviations.append(
            f"a global batch of {global_batch} clips instead of {PAPER_GLOBAL_BATCH}: the learning rate, the EMA "
            "and the centre were tuned for 2048 (set --per_device_train_batch_size, --gradient_accumulation_steps "
            "and the number of processes so that their product is 2048)"
        )
    if device_type == "cuda" and precision == "fp32":
        deviations.append("fp32 on GPU: the paper trains in mixed precision (add --bf16, or launch with bf16)")
    if device_type == "cuda" and training_args.dataloader_num_workers == 0:
        deviations.append(
            "no DataLoader workers on GPU: the training process decodes the audio itself and starves the GPU (add "
            "--dataloader_num_workers 8)"
        )
    if training_args.weight_decay_set != "all":
        deviations.append("no weight decay on biases and LayerNorm weights (--weight_decay_set transformers)")
    for deviation in deviations:
        logger.warning("Not the paper's recipe: %s.", deviation)


def write_model_card(trainer: MatpacTrainer, data_description: str, dataset_size: int | None) -> None:
    model, args = trainer.pretraining_model, trainer.args
    config = model.config
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    skips = next((entry for entry in reversed(trainer.state.log_history) if SKIP_COUNTERS[0] in entry), {})
    short, corrupt = (int(skips.get(name, 0)) for name in SKIP_COUNTERS)
    skipped_clips = (
        f"; the pipeline skipped a clip {short + corrupt:,} times ({short:,} shorter than a crop, {corrupt:,} "
        f"undecodable) until step {skips['step']}, a clip counted at every epoch that met it"
        if short + corrupt
        else ""
    )
    hypotheses = config.predictor_num_hypotheses
    variant = f" as MATPAC++ ({hypotheses} multiple-choice prediction heads)" if hypotheses > 1 else ""
    card = MODEL_CARD_TEMPLATE.read_text().format(
        model_name=Path(args.output_dir).name,
        model_id=args.output_dir,
        license="apache-2.0",
        description=f"Pre-trained{variant} for {trainer.state.global_step} steps on {data_description}.",
        sampling_rate=config.sampling_rate,
        num_mel_bins=config.num_mel_bins,
        patch_size=config.patch_size,
        num_frames=config.num_frames,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        embedding_size=config.embedding_size,
        num_parameters=f"{model.matpac.num_parameters():,}",
        dataset_name=data_description,
        num_train_clips=dataset_size if dataset_size is not None else "unknown (streamed)",
        crop_seconds=config.num_frames * config.hop_length / config.sampling_rate,
        skipped_clips=skipped_clips,
        num_train_steps=trainer.state.global_step,
        global_batch_size=global_batch_size(args),
        learning_rate=args.learning_rate,
        warmup_steps=args.get_warmup_steps(trainer.state.max_steps),
        lr_scheduler_type=args.lr_scheduler_type.value
        if hasattr(args.lr_scheduler_type, "value")
        else args.lr_scheduler_type,
        weight_decay=args.weight_decay,
        mask_ratio=config.mask_ratio,
        loss_pred_weight=config.loss_pred_weight,
        head_num_prototypes=config.head_num_prototypes,
        ema_decay=config.ema_decay,
        ema_end_decay=config.ema_end_decay,
        final_loss=f"{losses[-1]:.4f}" if losses else "not logged",
        evaluation="Not evaluated yet: run `run_probe.py` on this directory and paste its `results.md` here.",
    )
    (Path(args.output_dir) / "README.md").write_text(card)


def check_training_arguments(training_args: MatpacTrainingArguments) -> None:
    """Flags that would otherwise fail deep in the Trainer, or do something else than they say."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(training_args, name)}.")
    # Read as "not given", as the Trainer reads any max_steps <= 0, these would train for the epochs (300 by default).
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps must be a positive number of steps, or -1 to train for --num_train_epochs; got "
            f"{training_args.max_steps}."
        )
    if training_args.max_steps == -1 and not 0 < training_args.num_train_epochs < math.inf:
        raise ValueError(f"--num_train_epochs must be positive and finite, got {training_args.num_train_epochs:g}.")
    if not 0 <= training_args.warmup_epochs < math.inf:
        raise ValueError(f"--warmup_epochs must be at least 0 and finite, got {training_args.warmup_epochs:g}.")
    # NaN passes the Trainer's `max_grad_norm > 0` test as false: clipping would be silently off.
    if not 0 <= training_args.max_grad_norm < math.inf:
        raise ValueError(f"--max_grad_norm must be at least 0 (0: no clipping), got {training_args.max_grad_norm:g}.")
    # The Trainer gives the decay to AdamW per parameter group, where torch does not check its sign.
    if training_args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be at least 0, got {training_args.weight_decay:g}.")
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {training_args.output_dir!r} is a file, not a folder.")
    check_supported_arguments(training_args)  # as MatpacTrainer does, but before the data is prepared
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # nothing to pin for; the DataLoader would warn at every run


def resolve_resume(training_args: MatpacTrainingArguments) -> None:
    """
    `--resume_from_checkpoint last` becomes the last complete checkpoint of --output_dir (a checkpoint that a killed
    run left half-written is skipped with a warning); a checkpoint folder given by path must be complete.
    """
    value = training_args.resume_from_checkpoint
    if value is None:
        return
    if value.lower() in ("last", "true"):
        output_dir = Path(training_args.output_dir)
        checkpoint = last_complete_checkpoint(output_dir, warn=True)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint {value}: {output_dir} holds no complete checkpoint.")
        logger.info("Resuming from %s, the last complete checkpoint of %s.", checkpoint, output_dir)
        training_args.resume_from_checkpoint = str(checkpoint)
        return
    checkpoint = Path(value)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder.")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint {value!r} is not a complete checkpoint: {problem}. Resume from a complete one "
            "(`--resume_from_checkpoint last` finds the last), or start a new run from its weights with "
            "--model_name_or_path."
        )
    # A run resumed from an earlier checkpoint would write its own checkpoints over the later ones file by file: a
    # stop in the middle would leave a folder of two runs that reads as complete.
    step = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME)).global_step
    steps = checkpoint_steps(Path(training_args.output_dir))
    later = [path.name for path in sorted(steps, key=steps.get) if steps[path] > step]
    if later:
        raise ValueError(
            f"--resume_from_checkpoint {value!r} continues from step {step}, but --output_dir holds later checkpoints "
            f"({', '.join(later)}), which this run would write over: move them out of --output_dir to go on from "
            "this one, or resume from the last (`--resume_from_checkpoint last`)."
        )


# What a saved config records about its file rather than about the model.
CONFIG_METADATA = {"_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype", "transformers_version"}


def check_resumed_config(config: MatpacConfig, checkpoint: str) -> None:
    """
    A resumed run continues the checkpoint's run: this command's config (its --config_overrides or
    --model_name_or_path, and the schedules its flags set) must be the checkpoint's. The Trainer would load the weights
    into whatever model the command builds, and go on with another mask ratio or schedule without a word.
    """
    saved, current = MatpacConfig.from_pretrained(checkpoint).to_dict(), config.to_dict()
    differences = [
        f"{name} {saved.get(name)!r} (now {current.get(name)!r})"
        for name in sorted(set(saved) | set(current))
        if name not in CONFIG_METADATA and saved.get(name) != current.get(name)
    ]
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} continues a run of another config: {', '.join(differences)}. "
            "Resume with that run's flags, or start a new run from its weights with --model_name_or_path."
        )


def check_output_dir(training_args: MatpacTrainingArguments) -> None:
    """
    A new run needs an --output_dir without another run's files (whose checkpoints it would mix with, or rotate away
    with --save_total_limit): refused unless the run resumes from a checkpoint or --overwrite_output_dir is given.
    """
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or training_args.resume_from_checkpoint is not None:
        return
    if not [entry for entry in output_dir.iterdir() if entry.name != BUILTIN_CORPUS_DIR]:
        return
    if training_args.overwrite_output_dir:
        for checkpoint in sorted(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            logger.warning("--overwrite_output_dir: deleting %s of a previous run.", checkpoint)
            shutil.rmtree(checkpoint)
        return
    last = get_last_checkpoint(output_dir)
    held = f"the checkpoints of a run (last: {last})" if last else "files of a previous run"
    raise ValueError(
        f"--output_dir {training_args.output_dir!r} already holds {held}. Continue that run with "
        "--resume_from_checkpoint last, start over with --overwrite_output_dir (its checkpoints are deleted), or "
        "choose another --output_dir."
    )


class _HideEndlessEpochs(logging.Filter):
    """The Trainer reports `Num Epochs = sys.maxsize` for a dataset that repeats its epochs: the run is in steps."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{sys.maxsize:,}" not in record.getMessage()


def check_data_arguments(data_args: DataArguments) -> None:
    if data_args.dataset_size is not None and data_args.dataset_size < 1:
        raise ValueError(f"--dataset_size must be a positive number of clips, got {data_args.dataset_size}.")
    if data_args.train_cache is None:
        return
    sources = [
        flag for flag in DATA_SOURCE_FLAGS if getattr(data_args, flag.removeprefix("--")) and flag != "--train_cache"
    ]
    if sources:
        raise ValueError(f"--train_cache is the data to train on: leave out {' and '.join(sources)}.")
    if data_args.preprocess_to is not None:
        raise ValueError(
            "--preprocess_to builds a log-mel cache from an audio source and --train_cache trains from one: run them "
            "one after the other."
        )
    if data_args.audio_column is not None:
        raise ValueError("--audio_column applies to audio datasets, not to a log-mel cache (--train_cache).")


def open_audio_source(
    data_args: DataArguments, training_args: MatpacTrainingArguments, builtin: bool
) -> tuple[AudioSource, str]:
    """The audio to train on or to pre-process, and how the model card names it."""
    if builtin:
        corpus_dir = Path(training_args.output_dir) / BUILTIN_CORPUS_DIR
        logger.info(
            "No data source given (--dataset_name, --train_dir, --train_files or --train_cache): using a built-in "
            "synthetic corpus of %d clips in %s.",
            data_args.builtin_corpus_clips,
            corpus_dir,
        )
        with training_args.main_process_first(desc="built-in corpus"):
            source = generate_builtin_corpus(corpus_dir, num_clips=data_args.builtin_corpus_clips)
        return source, "the built-in synthetic corpus"
    source = load_audio_source(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_dir=data_args.train_dir,
        data_files=data_args.train_files,
        split=data_args.dataset_split,
        streaming=data_args.streaming if data_args.dataset_name or data_args.train_files else None,
        cache_dir=None,
    )
    return source, data_args.dataset_name or data_args.train_dir or ", ".join(data_args.train_files)


def build_logmel_cache(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MatpacTrainingArguments,
    source: AudioSource,
    data_description: str,
) -> None:
    """`--preprocess_to`: the log-mels of every clip, with the model's front end, for a later `--train_cache` run."""
    if training_args.process_index != 0:
        logger.info("Process %d leaves building the log-mel cache to the main process.", training_args.process_index)
        return
    config = load_config(model_args)
    metadata = preprocess_to_cache(
        source,
        data_args.preprocess_to,
        feature_extractor=MatpacFeatureExtractor.from_model_config(config),
        min_frames=config.num_frames,
        shard_size=data_args.preprocess_shard_size,
        num_workers=data_args.preprocessing_num_workers,
        audio_column=data_args.audio_column,
        overwrite=data_args.overwrite_cache,
        description=data_description,
    )
    logger.info(
        "Log-mel cache of %d clips written to %s. Train from it with `python run_pretraining.py --train_cache %s` "
        "and the model and training flags of your run.",
        metadata["num_clips"],
        data_args.preprocess_to,
        data_args.preprocess_to,
    )


class RunStopped(Exception):
    """The run stopped early on a signal, after saving a checkpoint: it is not finished."""


class _StopOnSignal(TrainerCallback):
    """
    SIGTERM, what a cluster sends before it stops or preempts a job: the step under way ends, is logged (and so
    checked) and saved as a checkpoint, and the run stops. Without this the work since the last checkpoint is lost.

    The processes of a distributed run receive the signal each at its own step: at the end of every step they agree
    (a one-number all-reduce on a CPU `group`, which keeps the GPU stream free of a host sync) so that all stop at
    the same step and save the same checkpoint, even those the signal did not reach.
    """

    def __init__(self, group: "torch.distributed.ProcessGroup | None" = None):
        self.group = group
        self.received = False  # by this process
        self.stopped = False  # the whole run, at the same step in every process

    def receive(self, signum: int, frame) -> None:
        self.received = True
        logger.warning("SIGTERM: saving a checkpoint after the step under way, then stopping.")

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received
        if self.group is not None:
            flag = torch.tensor([int(stop)], dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            stop = bool(flag.item())
        if stop:
            self.stopped = True
            control.should_log = control.should_save = control.should_training_stop = True


def cpu_group(args: MatpacTrainingArguments) -> "torch.distributed.ProcessGroup | None":
    """All the processes of a distributed run on the CPU (gloo): the run's own group unless it is on the GPU."""
    if args.world_size == 1:
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.ddp_timeout))


@contextlib.contextmanager
def stopping_on_sigterm(trainer: MatpacTrainer) -> Iterator[_StopOnSignal]:
    """Stops `trainer` with a checkpoint on SIGTERM (`_StopOnSignal`) while it trains, then restores the handler."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can handle signals
        yield _StopOnSignal()
        return
    stop = _StopOnSignal(cpu_group(trainer.args))
    trainer.add_callback(stop)
    trainer.workers_ignore_sigterm = True  # the script ends them (`stop_worker_processes`)
    previous = signal.signal(signal.SIGTERM, stop.receive)
    try:
        yield stop
    finally:
        # A run that stops is about to exit: a second SIGTERM (torchrun sends one when another process has exited)
        # must not kill it before it has said so.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if stop.stopped else previous)
        trainer.remove_callback(stop)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args, builtin = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.get_logger("transformers.trainer").addFilter(_HideEndlessEpochs())
    datasets.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    check_training_arguments(training_args)
    check_data_arguments(data_args)
    if model_args.model_name_or_path is None:
        build_config(model_args)  # bad --config_overrides fail now, not after the data is prepared
    with output_dir_lock(training_args):
        pretrain(model_args, data_args, training_args, builtin)


@contextlib.contextmanager
def output_dir_lock(training_args: MatpacTrainingArguments) -> Iterator[None]:
    """
    Holds --output_dir for this run (process 0 of a distributed one): a second run on the same folder, a job
    submitted twice, would mix its checkpoints with this one's, rotate them away or overwrite its results. A lock on
    the folder itself (`flock`) leaves no file behind and ends with the process; a file system without such locks
    is used unlocked, with a warning.
    """
    if fcntl is None or training_args.process_index != 0:
        yield
        return
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(output_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                f"--output_dir {str(output_dir)!r} is in use by another run of run_pretraining.py: wait for it to "
                "end, or choose another --output_dir."
            ) from None
        except OSError as error:
            logger.warning(
                "--output_dir %s cannot be locked (%s): nothing keeps another run out of it.", output_dir, error
            )
        yield
    finally:
        os.close(handle)


def pretrain(
    model_args: ModelArguments, data_args: DataArguments, training_args: MatpacTrainingArguments, builtin: bool
) -> None:
    """The run, once its arguments are checked and its --output_dir held: data, model, training, saving."""
    if training_args.device.type == "cpu" and keep_freed_memory_mapped():
        logger.info("On CPU: malloc keeps freed memory for the next steps (modeling_matpac/cpu_memory.py).")

    if data_args.train_cache is None:
        source, data_description = open_audio_source(data_args, training_args, builtin)
        if data_args.preprocess_to is not None:
            build_logmel_cache(model_args, data_args, training_args, source, data_description)
            return

    resolve_resume(training_args)
    check_output_dir(training_args)
    model = load_model(model_args)
    config = model.config
    feature_extractor = MatpacFeatureExtractor.from_model_config(config)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    if data_args.train_cache is not None:
        train_dataset = MatpacLogMelCacheDataset(
            data_args.train_cache,
            feature_extractor=feature_extractor,
            num_frames=config.num_frames,
            seed=data_seed,
            rank=training_args.process_index,
            world_size=training_args.world_size,
        )
        data_description = train_dataset.description
    else:
        train_dataset = MatpacPretrainingDataset(
            source,
            audio_column=data_args.audio_column,
            feature_extractor=feature_extractor,
            num_frames=config.num_frames,
            seed=data_seed,
            shuffle_buffer_size=data_args.shuffle_buffer_size,
            rank=training_args.process_index,
            world_size=training_args.world_size,
        )
    dataset_size = data_args.dataset_size or train_dataset.dataset_size
    if data_args.dataset_size is None and train_dataset.dataset_size and data_args.train_cache is None:
        logger.info(
            "Epochs count the source's %d clips, those shorter than a crop included (training skips them): a log-mel "
            "cache counts only the clips it keeps, or give the count with --dataset_size.",
            train_dataset.dataset_size,
        )
    resolve_schedules(model_args, training_args, config, dataset_size)
    if training_args.resume_from_checkpoint is not None:
        check_resumed_config(config, training_args.resume_from_checkpoint)
        if training_args.ignore_data_skip:
            logger.warning(
                "--ignore_data_skip: the data starts over from the first batch, and the counts of skipped clips "
                "restart at 0 for this part of the run."
            )
    log_recipe(training_args, config, dataset_size, training_args.device.type, check_paper=not builtin)
    logger.info(
        "Pre-training a %s encoder of %s parameters.",
        "MATPAC++" if config.predictor_num_hypotheses > 1 else "MATPAC",
        f"{model.matpac.num_parameters():,}",
    )

    trainer = MatpacTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collate_pretraining_batch,
        processing_class=feature_extractor,
        weight_decay_set=training_args.weight_decay_set,
    )
    try:
        with stopping_on_sigterm(trainer) as stop:
            result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except (OSError, SafetensorError) as error:  # e.g. the disk filled while a checkpoint was saved
        last = last_complete_checkpoint(Path(training_args.output_dir))
        where = f"the last complete checkpoint is {last}" if last else "no complete checkpoint was saved"
        raise OSError(f"{last_line(error)} ({where}).") from error
    if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
        trainer.accelerator.wait_for_everyone()  # process 0 has written the checkpoint the others name
        trainer.accelerator.end_training()
        raise RunStopped(
            f"stopped by SIGTERM at step {trainer.state.global_step} of {trainer.state.max_steps}, "
            f"{last_complete_checkpoint(Path(training_args.output_dir))} saved: the same command with "
            "--resume_from_checkpoint last continues the run."
        )
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_model_card(trainer, data_description, dataset_size)
        logger.info(
            "Saved the model to %s: AutoModel.from_pretrained(%r) loads the encoder after `import modeling_matpac`.",
            training_args.output_dir,
            training_args.output_dir,
        )
    # The end of a distributed script, as torch and accelerate ask: a process group left to the interpreter's exit
    # makes NCCL warn, and a gloo one can abort a process (SIGABRT) after everything was saved.
    trainer.accelerator.end_training()


def lost_peer(error: RuntimeError) -> bool:
    """Whether `error` is a collective that failed because another process of a distributed run stopped."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return isinstance(error, torch.distributed.DistError) or "closed by peer" in str(error)


def last_line(error: BaseException) -> str:
    """
    The line that says what went wrong: the last of the message, which for an error re-raised from a DataLoader
    worker is its traceback's, without the exception's name it starts with there.
    """
    line = str(error).strip().splitlines()[-1]
    name, separator, message = line.partition(": ")
    return message if separator and name.split(".")[-1] == type(error).__name__ else line


def exit_with(message: str, code: int = 1) -> NoReturn:
    """
    Ends the script with `message` on stderr in one write: the processes of a distributed run print their lines at
    the same moment, and with unbuffered output (`print` writes the newline apart) the lines interleaved.
    """
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    try:
        try:
            main()
        except BaseException:  # before the one line below is printed
            stop_worker_processes()
            raise
        finally:
            close_progress_bars()
    except (
        ValueError,
        OSError,
        SafetensorError,
        NoUsableClipError,
        NonFiniteTrainingError,
        BatchTooLargeError,
    ) as error:
        exit_with(f"run_pretraining.py: error: {last_line(error)}")
    except RunStopped as stopped:
        exit_with(f"run_pretraining.py: {stopped}", 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        exit_with(
            "run_pretraining.py: interrupted. The same command with --resume_from_checkpoint last continues the run "
            "from its last complete checkpoint; a stopped --preprocess_to resumes when run again.",
            130,
        )
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        # The process that stopped printed the reason; this one's collective only saw the connection close.
        rank = torch.distributed.get_rank()
        exit_with(f"run_pretraining.py: error: process {rank} stopped because another process of the run stopped.")
