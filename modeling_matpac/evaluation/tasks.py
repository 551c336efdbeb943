"""
The downstream tasks of the MATPAC paper (Table I) and how to read each one, either from the dataset in its original
published layout (`data_dir`) or from a script-free copy on the Hugging Face Hub.

Every loader returns a [`ProbeData`]: clip ids, a lazy audio source, targets, and either the official split of each
clip or its cross-validation fold. Clips whose file is missing or whose label is outside the task's vocabulary are
skipped with a warning; a missing or malformed layout raises [`ProbeDataError`] saying where to get the data.
[`check_clip_counts`] then compares each split with the complete dataset, so that skipped clips cannot go unnoticed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pickle
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..audio import AudioDecodeError, audio_duration, read_mono


logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".au", ".aiff", ".aif")
SPLITS = ("train", "valid", "test")

# ESC-50's classes in the order of its `target` column (0 = dog, 1 = rooster, ...): the authors' probe and label map.
ESC50_CLASSES = (
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow",
    "rain", "sea_waves", "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind", "pouring_water",
    "toilet_flush", "thunderstorm", "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps",
    "laughing", "brushing_teeth", "snoring", "drinking_sipping", "door_wood_knock", "mouse_click", "keyboard_typing",
    "door_wood_creaks", "can_opening", "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick",
    "glass_breaking", "helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells", "airplane",
    "fireworks", "hand_saw",
)  # fmt: skip
GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
US8K_CLASSES = (
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
)
NSYNTH_FAMILIES = (
    "bass",
    "brass",
    "flute",
    "guitar",
    "keyboard",
    "mallet",
    "organ",
    "reed",
    "string",
    "synth_lead",
    "vocal",
)


class ProbeDataError(ValueError):
    """The data of a task is missing or not in the expected layout."""


class AudioFiles:
    """Clips stored as files, decoded on access."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return read_mono(self.paths[index])

    def duration(self, index: int) -> float:
        return audio_duration(self.paths[index])

    def signature(self) -> str:
        """What the clips' content depends on: each file's path, size and modification time (a repaired file too)."""
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                status = os.stat(path)
                digest.update(f"{path}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\tmissing\n".encode())
        return digest.hexdigest()

    def subset(self, indices: np.ndarray) -> AudioFiles:
        return AudioFiles([self.paths[i] for i in indices])


class HubAudio:
    """
    Rows of a `datasets.Dataset` whose audio column is read undecoded and decoded with soundfile: an `Audio` feature,
    or the `{bytes, path}` records of a Parquet copy written without one.
    """

    def __init__(self, dataset, column: str = "audio", rows: Sequence[int] | None = None):
        from datasets import Audio

        feature = dataset.features[column]
        if isinstance(feature, Audio) and feature.decode:
            # datasets decodes with torchcodec, which needs FFmpeg system libraries: keep the encoded bytes instead.
            dataset = dataset.cast_column(column, Audio(decode=False))
        elif not isinstance(feature, Audio) and not (isinstance(feature, dict) and {"bytes", "path"} & set(feature)):
            raise ProbeDataError(
                f"The {column!r} column holds {feature}, not audio: an `Audio` feature or records of encoded `bytes` "
                "and/or a file `path`."
            )
        self.dataset, self.column = dataset, column
        self.rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _encoded(self, index: int) -> tuple[str | bytes, str]:
        audio = self.dataset[int(self.rows[index])][self.column]
        name = audio.get("path") or f"row {self.rows[index]}"
        source = audio.get("bytes") or audio.get("path")
        if not source:
            raise AudioDecodeError(f"{name} has neither audio bytes nor a file path")
        return source, name

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return read_mono(*self._encoded(index))

    def duration(self, index: int) -> float:
        return audio_duration(self._encoded(index)[0])

    def signature(self) -> str:
        """What the clips' content depends on: the dataset's fingerprint (its files and revision) and the rows used."""
        digest = hashlib.sha256(str(getattr(self.dataset, "_fingerprint", None)).encode())
        digest.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def subset(self, indices: np.ndarray) -> HubAudio:
        return HubAudio(self.dataset, self.column, self.rows[np.asarray(indices)])


@dataclass
class ProbeData:
    """
    One task's clips. `targets` is `(N,)` class indices for single-label tasks or `(N, C)` multi-hot for multi-label
    ones; `label_mask` `(N, C)` marks the annotated (clip, class) pairs of partially labelled data (OpenMIC). Exactly
    one of `split` (official train/valid/test) and `fold` (cross-validation fold number) is set. `num_folds` is the
    number of folds assigned at load (folds 1 to `num_folds`) where the loader draws them itself, so that a fold left
    without clips after decoding does not go unnoticed.
    """

    task: str
    classes: list[str]
    ids: list[str]
    audio: AudioFiles | HubAudio
    targets: np.ndarray
    split: np.ndarray | None = None
    fold: np.ndarray | None = None
    label_mask: np.ndarray | None = None
    source: str = ""
    num_folds: int | None = None

    def __post_init__(self) -> None:
        # Misaligned per-clip arrays would score clips with their neighbours' labels, without an error anywhere.
        per_clip = {"targets": self.targets, "split": self.split, "fold": self.fold, "label_mask": self.label_mask}
        lengths = {name: len(value) for name, value in per_clip.items() if value is not None}
        lengths["audio"] = len(self.audio)
        if any(length != len(self.ids) for length in lengths.values()):
            raise ValueError(f"{self.task}: per-clip data of different lengths: {len(self.ids)} ids, {lengths}.")
        if self.label_mask is not None and self.label_mask.shape != self.targets.shape:
            raise ValueError(
                f"{self.task}: label_mask of shape {self.label_mask.shape} for targets of shape {self.targets.shape}."
            )

    @property
    def multi_label(self) -> bool:
        return self.targets.ndim == 2

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, indices: np.ndarray) -> ProbeData:
        """The clips at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            ids=[self.ids[i] for i in indices],
            audio=self.audio.subset(indices),
            targets=self.targets[indices],
            split=None if self.split is None else self.split[indices],
            fold=None if self.fold is None else self.fold[indices],
            label_mask=None if self.label_mask is None else self.label_mask[indices],
        )


@dataclass
class Entry:
    """A clip as a layout lists it: its labels by name and its split name or fold number."""

    clip_id: str
    path: Path
    labels: list[str]
    group: str | int
    observed: list[str] | None = None  # annotated classes of a partially labelled clip; None means all


def _warn_skipped(task: str, reason: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        logger.warning("%s: skipped %d clip(s) %s: %s", task, len(names), reason, shown)


def _refuse_repeated_ids(task: str, ids: Sequence[str], groups: Sequence[str | int], source: Path | str) -> None:
    """A clip listed twice, in two splits or folds, could be trained on and tested on: the score would be wrong."""
    repeated = [clip_id for clip_id, count in Counter(ids).items() if count > 1]
    if repeated:
        listed = {group for clip_id, group in zip(ids, groups) if clip_id == repeated[0]}
        where = ", ".join(sorted(f"fold {group}" if isinstance(group, int) else group for group in listed))
        raise ProbeDataError(
            f"{task}: {len(repeated)} clip id(s) are listed more than once in {source}, e.g. {repeated[0]} "
            f"(in {where}); each clip must be in one split or fold only."
        )


def build_probe_data(
    task: ProbeTask, classes: Sequence[str], entries: Sequence[Entry], *, by_fold: bool, source: Path
) -> ProbeData:
    """
    Turns layout entries into a [`ProbeData`], skipping (with a warning) missing files and unknown labels, and refusing
    clips listed twice.
    """
    _refuse_repeated_ids(task.name, [entry.clip_id for entry in entries], [entry.group for entry in entries], source)
    index = {name: i for i, name in enumerate(classes)}
    kept, missing, unknown = [], [], []
    for entry in entries:
        outside = [label for label in entry.labels + (entry.observed or []) if label not in index]
        if not entry.path.is_file():
            missing.append(str(entry.path))
        elif outside:
            unknown.append(f"{entry.clip_id} ({', '.join(outside)})")
        else:
            kept.append(entry)
    _warn_skipped(task.name, "whose audio file is missing", missing)
    _warn_skipped(task.name, "with labels outside the task's vocabulary", unknown)
    several = [entry.clip_id for entry in kept if len(entry.labels) != 1]
    if not task.multi_label and several:
        raise ProbeDataError(f"{task.name} is single-label but these clips have no or several labels: {several[:5]}")
    if not kept:
        raise ProbeDataError(f"{task.name}: no usable clip found in {source}.")

    if task.multi_label:
        targets = np.zeros((len(kept), len(classes)), dtype=np.float32)
        for row, entry in enumerate(kept):
            targets[row, [index[label] for label in entry.labels]] = 1.0
    else:
        targets = np.array([index[entry.labels[0]] for entry in kept], dtype=np.int64)
    label_mask = None
    if any(entry.observed is not None for entry in kept):
        label_mask = np.zeros((len(kept), len(classes)), dtype=bool)
        for row, entry in enumerate(kept):
            observed = classes if entry.observed is None else entry.observed
            label_mask[row, [index[label] for label in observed]] = True
    groups = np.array([entry.group for entry in kept])
    return ProbeData(
        task=task.name,
        classes=list(classes),
        ids=[entry.clip_id for entry in kept],
        audio=AudioFiles([entry.path for entry in kept]),
        targets=targets,
        split=None if by_fold else groups.astype(str),
        fold=groups.astype(np.int64) if by_fold else None,
        label_mask=label_mask,
        source=str(source),
    )


def _require(root: Path, task: ProbeTask, *relative: str) -> None:
    """Raises the task's "where to get it" message when any of the layout's files is missing."""
    absent = [name for name in relative if not (root / name).exists()]
    if absent:
        raise ProbeDataError(f"{task.title} not found in {root}: missing {', '.join(absent)}.\n{task.where_to_get()}")


def _read_text(path: Path) -> str:
    """The text of a metadata file; one that cannot be read or is not UTF-8 is a malformed layout, not a crash."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ProbeDataError(f"{path} cannot be read as UTF-8 text: {error}") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ProbeDataError(f"{path} is not valid JSON: {error}") from None


def _read_csv_rows(path: Path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """The non-empty rows of a CSV with the line each ends on, for messages that point at a row."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            return [(reader.line_num, row) for row in reader if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ProbeDataError(f"{path} cannot be read as a UTF-8 CSV file: {error}") from None


def _read_csv(path: Path, columns: Sequence[str], delimiter: str = ",") -> list[dict[str, str]]:
    """The rows of a CSV with a header, which must name `columns`; every row must have a value for each of them."""
    lines = _read_csv_rows(path, delimiter)
    header = lines[0][1] if lines else []
    missing = [column for column in columns if column not in header]
    if missing:
        raise ProbeDataError(f"{path} lacks the column(s) {missing}; its header is {header}.")
    needed = max((position + 1 for position, name in enumerate(header) if name in columns), default=0)
    for line, row in lines[1:]:
        if len(row) < needed:
            raise ProbeDataError(f"{path}, line {line}: {len(row)} field(s), expected at least {needed}.")
    return [dict(zip(header, row)) for _, row in lines[1:]]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _integer(path: Path, row: dict[str, str], column: str, clip_id: str) -> int:
    try:
        return int(row[column])
    except ValueError:
        raise ProbeDataError(f"{path}: {column} {row[column]!r} of {clip_id} is not an integer.") from None


def _check_class_indices(task: ProbeTask, rows: list[dict[str, str]], index: str, name: str, path: Path) -> None:
    """The dataset numbers its classes itself: class i of the probe must be the one the dataset calls i."""
    wrong = sorted(
        {
            f"{row[index]} = {row[name]}"
            for row in rows
            if row[name] in task.vocabulary and row[index] != str(task.vocabulary.index(row[name]))
        }
    )
    if wrong:
        raise ProbeDataError(
            f"{path} numbers its classes otherwise than the official {task.title} ({', '.join(wrong[:5])}); "
            f"expected {', '.join(f'{i} = {label}' for i, label in enumerate(task.vocabulary[:3]))}, ..."
        )


# Original layouts -------------------------------------------------------------------------------------------------


def _load_folds_csv(
    root: Path, task: ProbeTask, metadata: str, columns: tuple[str, str, str], audio: str
) -> ProbeData:
    """
    A fold-split set listed in one CSV: `columns` name its file, class index and class name columns, and `audio` is
    the path of a clip under `root`, with `{name}` and `{fold}` for its file and fold.
    """
    path = root / metadata
    _require(root, task, metadata, "audio")
    file_column, index_column, name_column = columns
    rows = _read_csv(path, (file_column, "fold", index_column, name_column))
    _check_class_indices(task, rows, index_column, name_column, path)
    entries = []
    for row in rows:
        name = row[file_column]
        fold = _integer(path, row, "fold", name)
        entries.append(Entry(name, root / audio.format(name=name, fold=fold), [row[name_column]], fold))
    return build_probe_data(task, task.vocabulary, entries, by_fold=True, source=root)


def load_esc50(root: Path) -> ProbeData:
    columns = ("filename", "target", "category")
    return _load_folds_csv(root, TASKS["esc50"], "meta/esc50.csv", columns, "audio/{name}")


def load_us8k(root: Path) -> ProbeData:
    columns = ("slice_file_name", "classID", "class")
    return _load_folds_csv(root, TASKS["us8k"], "metadata/UrbanSound8K.csv", columns, "audio/fold{fold}/{name}")


def load_gtzan(root: Path) -> ProbeData:
    """`genres/<genre>/<genre>.000NN.{wav,au}` (the Kaggle copy names the folder `genres_original`) + split lists."""
    task = TASKS["gtzan"]
    _require(root, task, *(f"{split}_filtered.txt" for split in SPLITS))
    audio_root = next((root / name for name in ("genres", "genres_original") if (root / name).is_dir()), root)
    entries = []
    for split in SPLITS:
        for relative in _read_lines(root / f"{split}_filtered.txt"):
            path = audio_root / relative
            if not path.is_file() and path.with_suffix(".au").is_file():  # the original tarball ships .au files
                path = path.with_suffix(".au")
            entries.append(Entry(relative, path, [Path(relative).parent.name], split))
    return build_probe_data(task, task.vocabulary, entries, by_fold=False, source=root)


def load_nsynth(root: Path) -> ProbeData:
    task = TASKS["nsynth"]
    _require(root, task, *(f"nsynth-{split}/examples.json" for split in SPLITS))
    entries = []
    for split in SPLITS:
        path = root / f"nsynth-{split}/examples.json"
        examples = _read_json(path)
        if not isinstance(examples, dict):
            raise ProbeDataError(f"{path} must be a JSON object of notes, got a {type(examples).__name__}.")
        for key, example in examples.items():
            family = example.get("instrument_family_str") if isinstance(example, dict) else None
            if not isinstance(family, str):
                raise ProbeDataError(f"{path}: note {key!r} has no instrument_family_str string.")
            entries.append(Entry(key, root / f"nsynth-{split}/audio/{key}.wav", [family], split))
    return build_probe_data(task, task.vocabulary, entries, by_fold=False, source=root)


def load_openmic(root: Path) -> ProbeData:
    """Labels from `openmic-2018.npz`: annotated pairs are `Y_mask`, positives `Y_true >= 0.5` among them."""
    task = TASKS["openmic"]
    _require(
        root, task, "openmic-2018.npz", "class-map.json", "partitions/split01_train.csv", "partitions/split01_test.csv"
    )
    class_map = _read_json(root / "class-map.json")
    if not (
        isinstance(class_map, dict)
        and all(type(column) is int for column in class_map.values())
        and sorted(class_map.values()) == list(range(len(class_map)))
    ):
        raise ProbeDataError(
            f"{root / 'class-map.json'} must map each class name to its column of Y_true (0 to N - 1), got "
            f"{str(class_map)[:100]}."
        )
    classes = sorted(class_map, key=class_map.get)
    try:
        npz = np.load(root / "openmic-2018.npz", allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ProbeDataError(f"{root / 'openmic-2018.npz'} is not a readable .npz file: {error}") from None
    with npz:
        absent = {"Y_true", "Y_mask", "sample_key"} - set(npz.files)
        if absent:
            raise ProbeDataError(f"openmic-2018.npz lacks {sorted(absent)}; it has {npz.files}.")
        # The members are read (and their CRCs checked) here, not at `np.load`.
        try:
            y_true, y_mask = npz["Y_true"], npz["Y_mask"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise ProbeDataError(f"{root / 'openmic-2018.npz'}: cannot read Y_true and Y_mask: {error}") from None
        keys = _load_strings(npz, "sample_key")
    for name, array in (("Y_true", y_true), ("Y_mask", y_mask)):
        if array.dtype.kind not in "biuf":
            raise ProbeDataError(
                f"{root / 'openmic-2018.npz'}: {name} must be a numeric array, got dtype {array.dtype}."
            )
    y_mask = y_mask.astype(bool)
    for name, array in (("Y_true", y_true), ("Y_mask", y_mask)):
        if array.shape != (len(keys), len(classes)):
            raise ProbeDataError(
                f"{root / 'openmic-2018.npz'}: {name} has shape {array.shape}, expected ({len(keys)}, {len(classes)}) "
                "from sample_key and class-map.json."
            )
    row_of = {key: row for row, key in enumerate(keys)}
    entries, unlabelled = [], []
    for split in ("train", "test"):
        for key in _read_lines(root / f"partitions/split01_{split}.csv"):
            if key not in row_of:
                unlabelled.append(key)
                continue
            row = row_of[key]
            observed = [classes[c] for c in np.flatnonzero(y_mask[row])]
            positive = [classes[c] for c in np.flatnonzero(y_mask[row] & (y_true[row] >= 0.5))]
            entries.append(Entry(key, root / "audio" / key[:3] / f"{key}.ogg", positive, split, observed))
    _warn_skipped("openmic", "listed in the partition but absent from openmic-2018.npz", unlabelled)
    return build_probe_data(task, classes, entries, by_fold=False, source=root)


class _StringArrayUnpickler(pickle.Unpickler):
    """Rebuilds a numpy object array and nothing else: a crafted file cannot name any other callable to run."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a numpy array of strings")
        return super().find_class(module, name)


def _load_strings(npz: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    """
    The array `name` of an `.npz` as strings. The official OpenMIC file stores its keys as an object array, which
    `np.load` would unpickle with arbitrary code: it is read with an unpickler that builds numpy arrays only, and
    must hold strings only.
    """
    try:
        array = npz[name]
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ProbeDataError(f"{name} of {npz.zip.filename} cannot be read: {error}") from None
    except ValueError:  # an object array
        with npz.zip.open(f"{name}.npy") as file:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ProbeDataError(f"{name} of {npz.zip.filename}: unsupported .npy version {version}.") from None
            read_header[version](file)
            try:
                array = _StringArrayUnpickler(file).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
                raise ProbeDataError(f"{name} of {npz.zip.filename} is not an array of strings: {error}") from None
    if not isinstance(array, np.ndarray) or not all(isinstance(item, str) for item in array.ravel().tolist()):
        raise ProbeDataError(f"{name} of {npz.zip.filename} is not an array of strings.")
    return array.astype(str)


def _load_npy_strings(path: Path) -> list[str]:
    """A 1-D `.npy` array of strings as a list; anything else (empty, truncated, pickled, 0-d) is a data error."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ProbeDataError(f"{path} is not a numpy array of strings: {error}") from None
    if array.ndim != 1 or array.dtype.kind not in "SU":
        raise ProbeDataError(f"{path} is not a 1-D numpy array of strings: shape {array.shape}, dtype {array.dtype}.")
    return array.astype(str).tolist()


def load_mtt(root: Path) -> ProbeData:
    """
    `annotations_final.csv` (tab-separated, one 0/1 column per tag) + `mp3/<0-f>/<clip>.mp3` + the standard top-50
    split of Won et al. (`split/{train,valid,test}.npy` with `"<index>\\t<mp3 path>"` items and `split/tags.npy`).
    """
    task = TASKS["mtt"]
    _require(root, task, "annotations_final.csv", "split/tags.npy", *(f"split/{split}.npy" for split in SPLITS))
    tags = _load_npy_strings(root / "split/tags.npy")
    rows = _read_csv(root / "annotations_final.csv", ("mp3_path", *tags), delimiter="\t")
    annotations = {row["mp3_path"]: row for row in rows}
    audio_root = root / "mp3" if (root / "mp3").is_dir() else root
    entries, unannotated = [], []
    for split in SPLITS:
        for item in _load_npy_strings(root / f"split/{split}.npy"):
            relative = item.split("\t")[-1]
            if relative not in annotations:
                unannotated.append(relative)
                continue
            labels = [tag for tag in tags if annotations[relative][tag] == "1"]
            entries.append(Entry(relative, audio_root / relative, labels, split))
    _warn_skipped("mtt", "absent from annotations_final.csv", unannotated)
    return build_probe_data(task, tags, entries, by_fold=False, source=root)


def load_fsd50k(root: Path) -> ProbeData:
    task = TASKS["fsd50k"]
    truth = "FSD50K.ground_truth"
    _require(root, task, f"{truth}/dev.csv", f"{truth}/eval.csv", f"{truth}/vocabulary.csv")
    vocabulary = root / truth / "vocabulary.csv"
    classes = []
    for line, row in _read_csv_rows(vocabulary):
        if len(row) < 2:
            raise ProbeDataError(f"{vocabulary}, line {line}: expected `index,name,mid`, got {','.join(row)!r}.")
        classes.append(row[1])
    dev, dev_split = root / truth / "dev.csv", {"train": "train", "val": "valid"}
    entries = []
    for row in _read_csv(dev, ("fname", "labels", "split")):
        if row["split"] not in dev_split:
            raise ProbeDataError(f"{dev}: split {row['split']!r} of {row['fname']} is neither train nor val.")
        path = root / "FSD50K.dev_audio" / f"{row['fname']}.wav"
        entries.append(Entry(row["fname"], path, row["labels"].split(","), dev_split[row["split"]]))
    entries += [
        Entry(row["fname"], root / "FSD50K.eval_audio" / f"{row['fname']}.wav", row["labels"].split(","), "test")
        for row in _read_csv(root / truth / "eval.csv", ("fname", "labels"))
    ]
    return build_probe_data(task, classes, entries, by_fold=False, source=root)


def load_audiofolder(root: Path, num_folds: int = 5) -> ProbeData:
    """
    `<class>/<clip>` or `{train,valid,test}/<class>/<clip>` (`validation` and `dev` are read as `valid`). Without
    split folders the clips get `num_folds` stratified cross-validation folds (fixed seed, so folds are reproducible).
    A single class, or two folders for one split, is refused; a class that is never trained on before being tested is
    named in a warning.
    """
    task = TASKS["audiofolder"]
    if not root.is_dir():
        raise ProbeDataError(f"{root} is not a directory.\n{task.where_to_get()}")
    split_names = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}
    folders: dict[str, list[Path]] = {}
    for directory in sorted(root.iterdir()):
        if directory.is_dir() and directory.name in split_names:
            folders.setdefault(split_names[directory.name], []).append(directory)
    for split, directories in folders.items():
        if len(directories) > 1:  # reading one would silently drop the other's clips
            names = " and ".join(f"{directory.name}/" for directory in directories)
            raise ProbeDataError(f"{root} has {names}, which are both the {split} split: keep one.")
    split_dirs = {split: directories[0] for split, directories in folders.items()}
    if split_dirs and not {"train", "test"} <= split_dirs.keys():
        raise ProbeDataError(f"{root} has split folders {sorted(split_dirs)}: both train/ and test/ are needed.")

    def scan(directory: Path, group: str | int) -> list[Entry]:
        return [
            Entry(str(path.relative_to(root)), path, [path.parent.name], group)
            for path in sorted(directory.glob("*/*"))
            if path.suffix.lower() in AUDIO_EXTENSIONS
        ]

    if split_dirs:
        entries = [entry for split, directory in split_dirs.items() for entry in scan(directory, split)]
    else:
        entries = scan(root, 0)
    if not entries:
        raise ProbeDataError(
            f"No audio files ({', '.join(AUDIO_EXTENSIONS)}) in {root}/<class>/.\n{task.where_to_get()}"
        )
    classes = sorted({entry.labels[0] for entry in entries})
    if len(classes) < 2:  # every clip would be predicted right: a 100 % that measures nothing
        raise ProbeDataError(f"{root}: all clips are of the class {classes[0]!r}; a probe needs 2 classes or more.")
    if not split_dirs:
        from sklearn.model_selection import StratifiedKFold

        labels = [entry.labels[0] for entry in entries]
        largest = max(Counter(labels).values())
        if largest < num_folds:  # stratified folds need one class at least as large as the number of folds
            raise ProbeDataError(
                f"{root}: no class has {num_folds} clips (the largest has {largest}), too few for {num_folds} "
                "cross-validation folds: add clips, or put them in train/ and test/ folders."
            )
        folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels)
        for fold, (_, test) in enumerate(folds, start=1):
            for row in test:
                entries[row].group = fold
    groups: dict[str, set[str | int]] = {}
    for entry in entries:
        groups.setdefault(entry.labels[0], set()).add(entry.group)
    if split_dirs:
        untrained = [name for name in classes if "test" in groups[name] and "train" not in groups[name]]
        reason = "test clips but none in train/"
    else:
        untrained = [name for name in classes if len(groups[name]) == 1]
        reason = "clips in one fold only, so none to train on when it is tested"
    if untrained:  # the probe cannot predict these classes: a lower score that is no property of the model
        logger.warning("audiofolder: class(es) %s have %s.", ", ".join(untrained), reason)
    data = build_probe_data(task, classes, entries, by_fold=not split_dirs, source=root)
    return data if split_dirs else replace(data, num_folds=num_folds)


# Hub copies -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpec:
    """Where a script-free Hub copy keeps what the probe needs: label, clip id, fold and split names."""

    repo_id: str
    label_column: str
    id_column: str | None = None
    fold_column: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "valid": "validation", "test": "test"})


def load_from_hub(task_name: str, dataset: str | None = None) -> ProbeData:
    """Loads the task's Hub copy (or `dataset`, a repo id or a local folder in the same layout) with `datasets`."""
    from datasets import concatenate_datasets, load_dataset

    task = TASKS[task_name]
    if task.hub is None:
        raise ProbeDataError(f"{task.title} has no script-free copy on the Hub.\n{task.where_to_get()}")
    spec, repo = task.hub, dataset or task.hub.repo_id
    try:
        parts = {split: load_dataset(repo, split=hub_split) for split, hub_split in spec.splits.items()}
    except Exception as error:  # offline, unknown repo, or a split that does not exist
        raise ProbeDataError(
            f"Cannot load {task.title} from the Hub dataset {repo!r}: {error}\n{task.where_to_get()}"
        ) from error
    for split, part in parts.items():
        needed = (spec.label_column, spec.id_column, spec.fold_column, "audio")
        missing = [column for column in needed if column and column not in part.features]
        if missing:
            raise ProbeDataError(f"{repo} ({split}) lacks the column(s) {missing}; it has {list(part.features)}.")

    rows = concatenate_datasets(list(parts.values()))
    label_feature = rows.features[spec.label_column]
    names = [
        label_feature.int2str(label) if hasattr(label_feature, "int2str") else str(label)
        for label in rows[spec.label_column]
    ]
    ids = (
        [str(clip_id) for clip_id in rows[spec.id_column]]
        if spec.id_column
        else [f"{split}/{row}" for split, part in parts.items() for row in range(len(part))]
    )
    by_fold = spec.fold_column is not None
    groups = np.array(
        rows[spec.fold_column] if by_fold else [s for s, part in parts.items() for _ in range(len(part))]
    )
    _refuse_repeated_ids(task_name, ids, groups.tolist(), f"hub:{repo}")

    classes = list(task.vocabulary) if task.vocabulary else sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    kept = np.array([row for row, name in enumerate(names) if name in index], dtype=np.int64)
    unknown = [f"{ids[row]} ({name})" for row, name in enumerate(names) if name not in index]
    _warn_skipped(task_name, "with labels outside the task's vocabulary", unknown)
    return ProbeData(
        task=task_name,
        classes=classes,
        ids=[ids[row] for row in kept],
        audio=HubAudio(rows, rows=kept),
        targets=np.array([index[names[row]] for row in kept], dtype=np.int64),
        split=None if by_fold else groups[kept].astype(str),
        fold=groups[kept].astype(np.int64) if by_fold else None,
        source=f"hub:{repo}",
    )


# Registry ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTask:
    """A downstream task: label type, evaluation, the MATPAC paper's score, and where its data comes from."""

    name: str
    title: str
    multi_label: bool
    paper_score: float | None  # MATPAC's row of Table II of the paper, in %
    layout: str
    url: str
    load_local: Callable[[Path], ProbeData]
    folder_names: tuple[str, ...] = ()
    hub: HubSpec | None = None
    vocabulary: tuple[str, ...] = ()
    # Clips per official split or cross-validation fold of the complete dataset, as the paper's protocol uses it.
    expected_clips: dict[str | int, int] = field(default_factory=dict)
    known_issues: str = ""  # defects of common copies that make a split incomplete

    def where_to_get(self) -> str:
        hub = f" or load the Hub copy `{self.hub.repo_id}` by leaving out --data_dir" if self.hub else ""
        return f"Get {self.title} from {self.url}{hub}. Expected layout under --data_dir:\n{self.layout}"


TASKS: dict[str, ProbeTask] = {
    task.name: task
    for task in (
        ProbeTask(
            name="gtzan",
            title="GTZAN",
            multi_label=False,
            paper_score=85.3,
            layout="  genres/<genre>/<genre>.000NN.wav (or .au)\n"
            "  {train,valid,test}_filtered.txt  (fault-filtered split)",
            url="https://marsyas.info/index.html (audio) and "
            "https://github.com/jongpillee/music_dataset_split/tree/master/GTZAN_split (split lists)",
            load_local=load_gtzan,
            folder_names=("gtzan", "GTZAN"),
            hub=HubSpec("confit/gtzan-parquet", label_column="genre"),
            vocabulary=GTZAN_GENRES,
            expected_clips={"train": 443, "valid": 197, "test": 290},
            known_issues="The Kaggle copy of GTZAN (genres_original/) ships jazz/jazz.00054.wav undecodable: take "
            "that file from the original archive.",
        ),
        ProbeTask(
            name="esc50",
            title="ESC-50",
            multi_label=False,
            paper_score=93.5,
            layout="  meta/esc50.csv\n  audio/<filename>.wav",
            url="https://github.com/karolpiczak/ESC-50",
            load_local=load_esc50,
            folder_names=("esc50", "ESC-50", "ESC-50-master"),
            hub=HubSpec(
                "ashraq/esc50", "category", id_column="filename", fold_column="fold", splits={"train": "train"}
            ),
            vocabulary=ESC50_CLASSES,
            expected_clips=dict.fromkeys(range(1, 6), 400),
        ),
        ProbeTask(
            name="us8k",
            title="UrbanSound8K",
            multi_label=False,
            paper_score=89.4,
            layout="  metadata/UrbanSound8K.csv\n  audio/fold<N>/<slice_file_name>.wav",
            url="https://urbansounddataset.weebly.com/urbansound8k.html",
            load_local=load_us8k,
            folder_names=("us8k", "UrbanSound8K"),
            hub=HubSpec(
                "danavery/urbansound8K",
                "class",
                id_column="slice_file_name",
                fold_column="fold",
                splits={"train": "train"},
            ),
            vocabulary=US8K_CLASSES,
            expected_clips=dict(zip(range(1, 11), (873, 888, 925, 990, 936, 823, 838, 806, 816, 837))),
        ),
        ProbeTask(
            name="nsynth",
            title="NSynth (instrument family)",
            multi_label=False,
            paper_score=74.3,
            layout="  nsynth-{train,valid,test}/examples.json\n  nsynth-{train,valid,test}/audio/<note_str>.wav",
            url="https://magenta.tensorflow.org/datasets/nsynth",
            load_local=load_nsynth,
            folder_names=("nsynth", "NSynth"),
            vocabulary=NSYNTH_FAMILIES,
            expected_clips={"train": 289_205, "valid": 12_678, "test": 4_096},
            known_issues="nsynth-train is the largest archive: check that its extraction finished.",
        ),
        ProbeTask(
            name="openmic",
            title="OpenMIC-2018",
            multi_label=True,
            paper_score=85.3,
            layout="  openmic-2018.npz  (Y_true, Y_mask, sample_key)\n  class-map.json\n"
            "  partitions/split01_{train,test}.csv\n  audio/<key[:3]>/<key>.ogg",
            url="https://zenodo.org/records/1432913",
            load_local=load_openmic,
            folder_names=("openmic", "openmic-2018", "OpenMIC-2018"),
            expected_clips={"train": 14_915, "test": 5_085},
        ),
        ProbeTask(
            name="mtt",
            title="MagnaTagATune (top-50 tags)",
            multi_label=True,
            paper_score=41.1,
            layout="  annotations_final.csv\n  mp3/<0-f>/<clip>.mp3\n"
            "  split/{train,valid,test,tags}.npy  (top-50 split of Won et al., sota-music-tagging-models/split/mtat)",
            url="https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset (audio, annotations) and "
            "https://github.com/minzwon/sota-music-tagging-models/tree/master/split/mtat (split)",
            load_local=load_mtt,
            folder_names=("mtt", "magnatagatune", "MagnaTagATune"),
            expected_clips={"train": 15_244, "valid": 1_529, "test": 4_332},
            known_issues="The audio comes as a three-part zip (mp3.zip.001 to .003): concatenate the parts, then "
            "unzip.",
        ),
        ProbeTask(
            name="fsd50k",
            title="FSD50K",
            multi_label=True,
            paper_score=55.2,
            layout="  FSD50K.ground_truth/{dev,eval,vocabulary}.csv\n  FSD50K.dev_audio/<fname>.wav\n"
            "  FSD50K.eval_audio/<fname>.wav",
            url="https://zenodo.org/records/4060432",
            load_local=load_fsd50k,
            folder_names=("fsd50k", "FSD50K"),
            expected_clips={"train": 36_796, "valid": 4_170, "test": 10_231},
            known_issues="The audio comes as split zips (FSD50K.dev_audio.z01 ... .zip): merge them with "
            "`zip -s 0 FSD50K.dev_audio.zip --out dev.zip` before unzipping.",
        ),
        ProbeTask(
            name="audiofolder",
            title="a folder-per-class dataset",
            multi_label=False,
            paper_score=None,
            layout="  <class>/<clip>.wav  or  {train,valid,test}/<class>/<clip>.wav",
            url="your own data",
            load_local=load_audiofolder,
        ),
    )
}

PAPER_TASKS = tuple(name for name, task in TASKS.items() if task.paper_score is not None)


def get_task(name: str) -> ProbeTask:
    if name not in TASKS:
        raise ProbeDataError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name]


def load_task(name: str, data_dir: str | Path | None = None, hub_dataset: str | None = None) -> ProbeData:
    """Reads task `name` from `data_dir` (original layout) when given, otherwise from its Hub copy."""
    task = get_task(name)
    if data_dir is not None:
        root = Path(data_dir).expanduser().resolve()
        if not root.is_dir():
            raise ProbeDataError(f"--data_dir {root} does not exist.\n{task.where_to_get()}")
        return task.load_local(root)
    if name == "audiofolder":
        raise ProbeDataError("--dataset audiofolder needs --data_dir pointing at the folder-per-class dataset.")
    return load_from_hub(name, hub_dataset)


def clip_counts(data: ProbeData) -> dict[str | int, int]:
    """Clips per split (in train, valid, test order) or per fold (in fold order)."""
    if data.fold is not None:
        folds, counts = np.unique(data.fold, return_counts=True)
        return {int(fold): int(count) for fold, count in zip(folds, counts)}
    if data.split is None:
        return {}
    found = {split: int((data.split == split).sum()) for split in SPLITS}
    return {split: count for split, count in found.items() if count}


def format_counts(counts: dict[str | int, int]) -> str:
    return " / ".join(f"{'fold ' if isinstance(name, int) else ''}{name}: {count:,}" for name, count in counts.items())


def check_clip_counts(data: ProbeData, allow_incomplete: bool = False) -> bool:
    """
    Compares the clips of each split (or fold) with the complete dataset's, so that a partly extracted or partly
    readable copy cannot give a plausible score on a smaller test set. Raises [`ProbeDataError`] on a difference,
    or only warns with `allow_incomplete`; returns whether the counts are complete (`True` for a task without known
    sizes). Data that cannot be probed at all (no train or test clip, fewer than two folds with clips) is refused
    either way; a fold drawn at load that lost all its clips is warned about.
    """
    task, found = get_task(data.task), clip_counts(data)
    complete = not task.expected_clips or found == task.expected_clips
    if not complete:
        message = (
            f"{task.title}: found {format_counts(found)} clips, the complete dataset has "
            f"{format_counts(task.expected_clips)}. Missing files, labels outside the vocabulary and undecodable "
            "clips were skipped (see the warnings above)."
        )
        if task.known_issues:
            message += f" Note: {task.known_issues}"
        if not allow_incomplete:
            raise ProbeDataError(f"{message} Pass --allow_incomplete to probe these clips anyway.")
        logger.warning("%s Probing these clips anyway (--allow_incomplete).", message)
    if data.fold is not None and len(found) < 2:
        raise ProbeDataError(f"{data.task}: clips in {format_counts(found)} only; cross-validation needs 2 folds.")
    if data.split is not None and not {"train", "test"} <= found.keys():
        raise ProbeDataError(f"{data.task}: found {format_counts(found)} clips; train and test clips are needed.")
    empty = [fold for fold in range(1, (data.num_folds or 0) + 1) if fold not in found]
    if empty:
        # The folds are a random partition, not a published protocol: the other folds still test every clip left
        # with a probe that never saw it, on fewer folds than asked.
        logger.warning(
            "%s: fold(s) %s of %d have no clip left (undecodable clips were skipped): cross-validating on the other "
            "%d folds.",
            data.task,
            ", ".join(map(str, empty)),
            data.num_folds,
            data.num_folds - len(empty),
        )
    return complete and not empty


def find_task_dir(name: str, data_root: str | Path) -> Path | None:
    """The folder of task `name` inside `data_root` (`--all`), under its key or the name of its official archive."""
    for folder in get_task(name).folder_names:
        if (Path(data_root) / folder).is_dir():
            return Path(data_root) / folder
    return None
