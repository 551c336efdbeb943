"""
The paper's linear-probe protocol on frozen clip embeddings and its metrics.

One linear layer on standardised embeddings, Adam (lr 1e-4), batch 128, early stopping on the validation loss keeping
the best epoch (at most 200 epochs, patience 20, EVAR's settings for M2D), 5 runs with different seeds, mean and 95 %
confidence interval. Multi-label tasks use sigmoid + BCE and macro mAP, single-label ones softmax + cross-entropy and
accuracy.

Validation rule: tasks with an official validation split use it. Cross-validation tasks (ESC-50, US8K) hold out one
fold for test and, as EVAR (the evaluation code of M2D, on which MATPAC builds) does, draw the validation set at
random from the remaining folds (10 %, re-drawn with each run's seed); EVAR retries its random split until every class
is in it, we stratify by class, which guarantees the same. OpenMIC, which has only train/test, gets its validation set
the same way. The standardisation statistics come from the clips the probe is trained on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, average_precision_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from .tasks import ProbeData, ProbeDataError


logger = logging.getLogger(__name__)


@dataclass
class ProbeSettings:
    """Hyper-parameters of the linear probe; the defaults are the paper's protocol."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate of the probe."})
    batch_size: int = field(default=128, metadata={"help": "Probe training batch size."})
    max_epochs: int = field(default=200, metadata={"help": "Epoch limit of one probe training."})
    patience: int = field(default=20, metadata={"help": "Epochs without a lower validation loss before stopping."})
    num_runs: int = field(default=5, metadata={"help": "Runs with different seeds (seed, seed + 1, ...)."})
    seed: int = field(default=42, metadata={"help": "Seed of the first run."})
    valid_fraction: float = field(
        default=0.1, metadata={"help": "Share of the training clips used for validation where no split has one."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for extraction and probing (default: cuda if available)."}
    )

    def __post_init__(self):
        """Values that would crash deep in the training loop, or train nothing and report a number anyway."""
        for name in ("batch_size", "max_epochs", "patience", "num_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.learning_rate <= torch.finfo(torch.float32).max:  # the probe trains in float32
            raise ValueError(f"learning_rate must be positive and finite, got {self.learning_rate:g}.")
        if not 0 <= self.seed <= 2**32 - self.num_runs:  # the runs' seeds go to numpy and scikit-learn
            raise ValueError(f"seed must be between 0 and 2**32 - num_runs, got {self.seed}.")
        if not 0 < self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be between 0 and 1, got {self.valid_fraction:g}.")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"device {self.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')."
                ) from None
            if device.type == "meta":
                raise ValueError("device 'meta' holds no data: probe on 'cpu' or 'cuda'.")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r}, but no CUDA device is available.")


@dataclass
class Split:
    """Clip positions of one train/valid/test partition (a fold of a cross-validation task, or the official split)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    unstratified: bool = False  # a single-label validation set drawn without stratification (see `make_splits`)


def _carve_validation(
    positions: np.ndarray, data: ProbeData, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """
    Splits `positions` into train and validation, stratified by class where every class has two clips; says whether
    a single-label draw could not be stratified.
    """
    stratify = None if data.multi_label else data.targets[positions]
    try:
        train, valid = train_test_split(positions, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as error:  # a class with a single clip, or fewer validation clips than classes
        logger.debug("%s: validation set drawn without stratification (%s)", data.task, error)
        try:
            train, valid = train_test_split(positions, test_size=fraction, random_state=seed)
        except ValueError:
            raise ProbeDataError(
                f"{data.task}: {len(positions)} training clips cannot give up a validation share of {fraction:g} and "
                "keep clips to train on."
            ) from None
        return np.sort(train), np.sort(valid), True
    return np.sort(train), np.sort(valid), False


def make_splits(data: ProbeData, seed: int, valid_fraction: float = 0.1) -> list[Split]:
    """The partitions a run evaluates on: one per fold for cross-validation tasks, else the official one."""
    everything = np.arange(len(data))
    if data.fold is not None:
        splits = []
        for fold in np.unique(data.fold):
            train, valid, unstratified = _carve_validation(everything[data.fold != fold], data, valid_fraction, seed)
            splits.append(Split(f"fold{fold}", train, valid, everything[data.fold == fold], unstratified))
        return splits
    train, valid, test = (everything[data.split == name] for name in ("train", "valid", "test"))
    if len(train) == 0 or len(test) == 0:
        raise ProbeDataError(
            f"{data.task}: the data has {len(train)} training and {len(test)} test clips; both are needed."
        )
    unstratified = False
    if len(valid) == 0:
        train, valid, unstratified = _carve_validation(train, data, valid_fraction, seed)
    return [Split("official", train, valid, test, unstratified)]


@dataclass
class LinearProbe:
    """A trained probe: standardisation statistics and the linear layer acting on standardised embeddings."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    multi_label: bool
    best_epoch: int
    valid_losses: list[float]

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Class probabilities: sigmoid for multi-label tasks, softmax otherwise."""
        logits = torch.from_numpy(((embeddings - self.mean) / self.scale) @ self.weight.T + self.bias)
        return (logits.sigmoid() if self.multi_label else logits.softmax(-1)).numpy()

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The same layer acting on raw embeddings: W' = W / scale, b' = b - W' @ mean."""
        weight = self.weight / self.scale
        return weight, self.bias - weight @ self.mean


def _loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if targets.ndim == 1:
        return nn.functional.cross_entropy(logits, targets)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if mask is None:
        return losses.mean()
    return (losses * mask).sum() / mask.sum().clamp(min=1)  # only the annotated (clip, class) pairs count


def train_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    num_classes: int,
    settings: ProbeSettings,
    seed: int,
    mask_train: np.ndarray | None = None,
    mask_valid: np.ndarray | None = None,
) -> LinearProbe:
    """Trains one linear probe and returns it at the epoch with the lowest validation loss."""
    scaler = StandardScaler().fit(x_train)
    device = torch.device(settings.device or "cpu")

    def tensor(array: np.ndarray | None, dtype=torch.float32) -> torch.Tensor | None:
        return None if array is None else torch.as_tensor(array, dtype=dtype, device=device)

    multi_label = y_train.ndim == 2
    target_dtype = torch.float32 if multi_label else torch.long
    xt, yt, mt = tensor(scaler.transform(x_train)), tensor(y_train, target_dtype), tensor(mask_train)
    xv, yv, mv = tensor(scaler.transform(x_valid)), tensor(y_valid, target_dtype), tensor(mask_valid)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(x_train.shape[1], num_classes).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(layer.parameters(), lr=settings.learning_rate)
    valid_losses, best_epoch, best_state = [], 0, None
    for epoch in range(1, settings.max_epochs + 1):
        layer.train()
        for batch in torch.randperm(len(xt), generator=generator).to(device).split(settings.batch_size):
            loss = _loss(layer(xt[batch]), yt[batch], None if mt is None else mt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        layer.eval()
        with torch.no_grad():
            valid_losses.append(_loss(layer(xv), yv, mv).item())
        if valid_losses[-1] < min(valid_losses[:-1], default=math.inf):
            best_epoch = epoch
            best_state = {name: value.detach().clone() for name, value in layer.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    if best_state is None:
        raise ValueError(
            f"The probe's validation loss was never finite ({valid_losses[0]}): lower --learning_rate, or check the "
            "embeddings."
        )
    return LinearProbe(
        mean=scaler.mean_,
        scale=scaler.scale_,
        weight=best_state["weight"].double().cpu().numpy(),
        bias=best_state["bias"].double().cpu().numpy(),
        multi_label=multi_label,
        best_epoch=best_epoch,
        valid_losses=valid_losses,
    )


def accuracy(targets: np.ndarray, scores: np.ndarray) -> float:
    return float(accuracy_score(targets, scores.argmax(axis=1)))


def mean_average_precision(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None) -> float:
    """
    Macro average precision over the classes with at least one positive (sklearn scores a class without positives 0,
    which would bias the mean); with `mask`, each class is scored on its annotated clips only.
    """
    mask = np.ones(targets.shape, dtype=bool) if mask is None else mask.astype(bool)
    per_class = [
        average_precision_score(targets[mask[:, c], c], scores[mask[:, c], c])
        for c in range(targets.shape[1])
        if targets[mask[:, c], c].sum() > 0
    ]
    if not per_class:
        raise ProbeDataError("No class has a positive test clip: mAP is undefined.")
    return float(np.mean(per_class))


def score(data: ProbeData, positions: np.ndarray, probe_scores: np.ndarray) -> float:
    """The task's metric (mAP or accuracy) on the clips at `positions`."""
    if data.multi_label:
        mask = None if data.label_mask is None else data.label_mask[positions]
        return mean_average_precision(data.targets[positions], probe_scores, mask)
    return accuracy(data.targets[positions], probe_scores)


def confidence_interval(values: list[float], level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of the mean (0 for a single run)."""
    if len(values) < 2:
        return 0.0
    return float(stats.t.ppf((1 + level) / 2, len(values) - 1) * stats.sem(values))


@dataclass
class ProbeOutcome:
    """
    Test scores of every run (averaged over folds) and of every fold, plus the first run's first probe and the split
    it was tested on (`fold<k>`, the lowest fold with clips, or `official`).
    """

    run_scores: list[float]
    fold_scores: list[list[float]]
    best_epochs: list[list[int]]
    first_probe: LinearProbe
    first_split: str
    seconds: float


def evaluate(data: ProbeData, embeddings: np.ndarray, settings: ProbeSettings) -> ProbeOutcome:
    """Runs the protocol: `num_runs` seeds x every split; `embeddings` are aligned with `data`."""
    start = time.perf_counter()
    run_scores, fold_scores, best_epochs, first_probe, first_split = [], [], [], None, None
    for run in range(settings.num_runs):
        seed = settings.seed + run
        scores, epochs = [], []
        splits = make_splits(data, seed, settings.valid_fraction)
        unstratified = sum(split.unstratified for split in splits)
        if run == 0 and unstratified:
            logger.warning(
                "%s: %d of %d validation sets were drawn without stratification (a class with a single training clip, "
                "or fewer validation clips than classes): early stopping may not see every class.",
                data.task,
                unstratified,
                len(splits),
            )
        for split in splits:
            masks = (
                (None, None)
                if data.label_mask is None
                else (data.label_mask[split.train], data.label_mask[split.valid])
            )
            probe = train_probe(
                embeddings[split.train],
                data.targets[split.train],
                embeddings[split.valid],
                data.targets[split.valid],
                len(data.classes),
                settings,
                seed,
                *masks,
            )
            if first_probe is None:
                first_probe, first_split = probe, split.name
            scores.append(score(data, split.test, probe.scores(embeddings[split.test])))
            epochs.append(probe.best_epoch)
        logger.info("%s run %d (seed %d): %.4f, best epochs %s", data.task, run + 1, seed, np.mean(scores), epochs)
        run_scores.append(float(np.mean(scores)))
        fold_scores.append(scores)
        best_epochs.append(epochs)
    return ProbeOutcome(run_scores, fold_scores, best_epochs, first_probe, first_split, time.perf_counter() - start)


def check_classifier_encoder(model) -> None:
    """Only a MATPAC encoder can carry the probe as a `MatpacForAudioClassification`: checked before any work."""
    if model.config.model_type != "matpac":
        raise ValueError(f"--save_head needs a MATPAC encoder, got a {model.config.model_type!r} model.")


def check_head_folder(output_dir: str | Path, model_name_or_path: str) -> None:
    """
    `save_classifier` writes a whole model into `output_dir`: it may replace an earlier probe (a saved audio
    classifier) there, never another model's files, such as the encoder's own checkpoint. Checked before any work.
    """
    folder = Path(output_dir)
    if Path(model_name_or_path).exists() and folder.resolve() == Path(model_name_or_path).resolve():
        raise ValueError(
            f"--save_head {str(folder)!r} is the encoder's own folder: the probe would overwrite the model it reads. "
            "Pass another folder."
        )
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    try:
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        architectures = None
    if architectures != ["MatpacForAudioClassification"]:
        names = sorted(path.name for path in folder.iterdir())
        raise ValueError(
            f"--save_head {str(folder)!r} holds files that are not a saved probe ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}): pass an empty or new folder."
        )


def probe_card(classifier, output_dir: str | Path, encoder: str, task: str, score: str) -> str:
    """The model card (`README.md`) of a probe saved by `save_classifier`: what it is, how it scored, how to use it."""
    config = classifier.config
    multi_label = config.problem_type == "multi_label_classification"
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: audio-classification",
            "tags:\n- audio\n- matpac\n- audio-classification",
            "---",
            "",
            f"# {task}: a linear probe on {encoder}",
            "",
            f"A linear probe trained by `matpac`'s `run_probe.py` on the frozen clip embedding (`pooler_output`, "
            f"{config.embedding_size}-d) of the MATPAC encoder `{encoder}`, saved with it as a "
            "`MatpacForAudioClassification`; the probe's standardisation is folded into its linear layer.",
            "",
            f"- **Classes:** {config.num_labels} (`id2label`), "
            + ("multi-label: the pipeline applies a sigmoid." if multi_label else "the pipeline applies a softmax."),
            f"- **Score:** {score}",
            "",
            "## How to use",
            "",
            "```python",
            "import modeling_matpac  # or pass trust_remote_code=True",
            "from modeling_matpac.audio import decode_mono_16k",
            "from transformers import pipeline",
            "",
            f'classifier = pipeline("audio-classification", model="{output_dir}")',
            'classifier(decode_mono_16k("clip.wav").numpy(), top_k=5)  # [{"label": ..., "score": ...}, ...]',
            "```",
            "",
        ]
    )


def save_classifier(
    model,
    feature_extractor,
    probe: LinearProbe,
    classes: list[str],
    output_dir: str | Path,
    card: tuple[str, str, str] | None = None,
) -> Path:
    """
    Saves `model` (a `MatpacModel`) with `probe` on top as a `MatpacForAudioClassification` directory, loadable by
    `pipeline("audio-classification")`. The standardisation is folded into the linear layer so that it acts on the raw
    `pooler_output`. `card` (encoder, task, score) adds a model card.
    """
    from ..modeling_matpac import MatpacForAudioClassification

    check_classifier_encoder(model)
    config = copy.deepcopy(model.config)
    config.id2label = dict(enumerate(classes))
    config.label2id = {name: index for index, name in enumerate(classes)}
    config.problem_type = "multi_label_classification" if probe.multi_label else "single_label_classification"
    config.freeze_encoder = True
    # The probe reads `pooler_output` as it is: not an AudioSet tagger's frequency mean and BatchNorm.
    config.classifier_pooling, config.classifier_batch_norm = "concatenate", False
    classifier = MatpacForAudioClassification(config)
    classifier.matpac.load_state_dict(model.state_dict())
    weight, bias = probe.folded()
    with torch.no_grad():
        classifier.classifier.weight.copy_(torch.from_numpy(weight))
        classifier.classifier.bias.copy_(torch.from_numpy(bias))
    classifier.save_pretrained(output_dir)
    feature_extractor.save_pretrained(output_dir)
    if card is not None:
        (Path(output_dir) / "README.md").write_text(probe_card(classifier, output_dir, *card), encoding="utf-8")
    return Path(output_dir)
