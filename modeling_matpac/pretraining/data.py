# Copyright 2025 The matpac authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Audio sources -> batches of normalised log-mel crops for MATPAC pre-training.

Every clip is decoded with `soundfile` (no FFmpeg, torchcodec or torchaudio), averaged to mono, resampled to 16 kHz and
cropped at random to 6.08 s (`400 + 607 * 160 = 97,520` samples, exactly 608 frames), once per clip and epoch; only
the frames of the crop are read from files that can seek. Clips shorter than the crop are skipped (the authors keep
only clips of at least 6.08 s); undecodable clips (a null audio cell too), and clips whose samples (anywhere, not only
in the crop) or log-mel crop are not finite or absurdly large, are skipped with a warning. Neither stops a run: both
are counted, see below. `logmel_cache` decodes a source once instead and trains on crops of the stored log-mels, with
the same contract.

Determinism. The order of an epoch depends on `(seed, epoch)` and a clip's crop on `(seed, epoch, clip)` only, never on
the number of processes or DataLoader workers (which only decide how clips are grouped into batches), so a run resumed
from a checkpoint with the same processes and workers sees the same batches as the uninterrupted run.

Distribution. Each "consumer" (a DataLoader worker of a process, or the process itself without workers) reads its own
part of every epoch: clips with random access (files of a folder, rows of a map-style `datasets.Dataset`) are dealt
round-robin from the epoch's permutation; a streamed `datasets.IterableDataset` is split by whole shards when it has at
least as many shards as there are consumers, else every consumer reads all shards and keeps every n-th clip, and each
consumer's clips then pass through `datasets`' shuffle buffer (`shuffle_buffer_size` clips, seeded by `(seed, epoch)`)
so that a clip's batch-mates change every epoch. Each clip is thus used exactly once per epoch. A stream is still only
shuffled within the buffer's reach; clips with random access (and the log-mel cache) are permuted fully every epoch.
The dataset repeats epochs forever (`infinite=True`), so that processes whose shares differ in length never run dry at
different times and hang DDP; each consumer moves on to its next epoch on its own (shares differing by a clip or a
shard make consumers drift apart by that much per epoch). The Trainer then needs `max_steps` (convert epochs with
`dataset_size`, which counts clips before skipping). Which share a dataset reads is set explicitly, by `rank` and
`world_size`: `run_pretraining.py` passes the process's, and `MatpacTrainer` refuses a dataset split for another
process. With a plain `Trainer`, leave them at 0 and 1 and accelerate's default dispatching has process 0 read for all.

Skip counts. The clips skipped (too short, undecodable) are counted where they are met, in the DataLoader worker that
reads them. Each example carries the clips its consumer skipped since its previous example to the collate function
(in the same worker); `SkippedClips`, the collate function `MatpacTrainer` gives its loader, takes them out there and
reports each batch's totals beside the batches, on a queue, so that batches hold only model inputs. The totals of the
batches consumed so far are exact and deterministic, and come back after a resumption (see `SkippedClips`).
"""

import glob
import itertools
import multiprocessing
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import fsspec.asyn
import numpy as np
import torch
from transformers.utils import logging

from ..audio import AUDIO_EXTENSIONS, SAMPLING_RATE, AudioDecodeError, check_all_samples, decode_mono_16k_crop
from ..feature_extraction_matpac import MatpacFeatureExtractor


logger = logging.get_logger(__name__)

SHARD_FORMATS = {".parquet": "parquet", ".tar": "webdataset"}
# Clips in the shuffle buffer of each consumer of a stream (`datasets`' default). It holds encoded clips: about 1 MB
# each for AudioSet's 10 s FLAC at 48 kHz (an estimate from the format), so about 1 GB per DataLoader worker.
DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
# Columns that tag each streamed row with its shard and its row in the shard.
_SHARD_KEY, _ROW_KEY = "__matpac_shard", "__matpac_row"

AudioSource = Sequence[str | os.PathLike] | datasets.Dataset | datasets.IterableDataset


class NoUsableClipError(RuntimeError):
    """A data consumer met no usable clip in several epochs in a row: its clips are too short or undecodable."""


# Epochs in a row without a usable clip after which a data consumer stops the run. One is not enough: a small source
# dealt to many consumers gives one of them an epoch of only short or undecodable clips now and then, and a run
# resumed at that epoch would stop there again. A consumer that has cropped before stops only after many: its source
# has changed (files removed or damaged) since.
EMPTY_EPOCHS_BEFORE_ANY_CROP = 2
EMPTY_EPOCHS_AFTER_A_CROP = 10
SKIPS = ("short", "corrupt")  # why a clip is skipped
SKIP_COUNTERS = tuple(f"num_skipped_{reason}" for reason in SKIPS)  # the examples' counts of each


def _walk_files(root: Path) -> list[Path]:
    """
    Every file under `root`, through linked folders too (a corpus assembled from links to other disks), each real
    folder once (a link loop ends); a folder that cannot be listed is named in a warning, not silently left out.
    """

    def unreadable(error: OSError) -> None:
        logger.warning(f"Cannot list {error.filename} ({error.strerror}): its audio files are left out.")

    seen, files = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        files += [Path(folder) / name for name in names]
    return files


def list_audio_files(directory: str | os.PathLike) -> list[Path]:
    """All audio files (wav, flac, ogg, mp3) under `directory`, recursively, in the sorted order of their paths."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"Audio folder {os.fspath(directory)!r} does not exist or is not a directory.")
    every_file = _walk_files(root)
    files = [path for path in every_file if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file()]
    if not files:
        message = f"No audio file ({', '.join(AUDIO_EXTENSIONS)}) under {os.fspath(root)!r}."
        suffixes = {path.suffix for path in every_file}
        if suffixes & SHARD_FORMATS.keys():
            message += " It holds parquet or webdataset shards: pass them as `data_files` instead."
        elif ".arrow" in suffixes:
            message += (
                " It holds Arrow files: if it is a log-mel cache written by `preprocess_to_cache`, read it with "
                "`MatpacLogMelCacheDataset` (`run_pretraining.py --train_cache`)."
            )
        raise ValueError(message)
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _resolve_shard_files(data_files: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], str]:
    """Expand files, folders and glob patterns into sorted shard paths, and tell their `datasets` builder."""
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not patterns:
        raise ValueError("`data_files` is empty: expected parquet or webdataset (.tar) shards.")
    files = set()
    for pattern in map(os.fspath, patterns):
        if os.path.isdir(pattern):
            matches = [
                path
                for path in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                if Path(path).suffix in SHARD_FORMATS
            ]
        else:
            matches = glob.glob(pattern, recursive=True)
        matches = [os.path.abspath(path) for path in matches if os.path.isfile(path)]
        if not matches:
            raise FileNotFoundError(f"No shard file matches {pattern!r}.")
        files.update(matches)
    suffixes = {Path(path).suffix for path in files}
    if len(suffixes) != 1 or not suffixes <= SHARD_FORMATS.keys():
        raise ValueError(
            f"`data_files` must all be parquet (.parquet) or all webdataset (.tar) shards, got {sorted(suffixes)}."
        )
    return sorted(files), SHARD_FORMATS[suffixes.pop()]


def load_audio_source(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    data_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    split: str = "train",
    streaming: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AudioSource:
    """
    Open one pre-training audio source, given by exactly one of:

    - `dataset_name`: a Hub dataset (with `dataset_config_name` and `split`, where `"a+b"` concatenates two splits),
      streamed unless `streaming=False` (which a webdataset-format Hub dataset does not support without torchcodec);
    - `data_dir`: a local folder of audio files, read lazily file by file (`streaming` does not apply);
    - `data_files`: local parquet or webdataset `.tar` shards (files, folders or glob patterns), loaded into the
      `datasets` cache unless `streaming=True`, so that the dataset size is known.

    The result is what `MatpacPretrainingDataset` takes as `source`.
    """
    given = [
        name
        for name, value in [("dataset_name", dataset_name), ("data_dir", data_dir), ("data_files", data_files)]
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "Expected exactly one audio source: `dataset_name` (a Hub dataset), `data_dir` (a folder of audio files) "
            f"or `data_files` (parquet or webdataset .tar shards); got {', '.join(given) or 'none'}."
        )
    if dataset_config_name is not None and dataset_name is None:
        raise ValueError("`dataset_config_name` only applies to a Hub dataset given by `dataset_name`.")
    if data_dir is not None:
        return list_audio_files(data_dir)
    if dataset_name is not None:
        if dataset_config_name is None:
            logger.warning(
                f"No configuration named for the Hub dataset {dataset_name!r}: `datasets` loads its default one, "
                "which may be a small part of it (agkphysics/AudioSet's default, `balanced`, has 18,685 clips; the "
                "paper's data is its `full` configuration, split `bal_train+unbal_train`)."
            )
        return datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming is not False, cache_dir=cache_dir
        )
    files, builder = _resolve_shard_files(data_files)
    features = None
    if builder == "webdataset":
        # `datasets` types the audio members of a tar as `Audio`, whose encoding needs torchcodec even for raw bytes:
        # read them as plain bytes instead.
        inferred = datasets.load_dataset(
            builder, data_files={split: files}, split=split, streaming=True, cache_dir=cache_dir
        ).features
        features = datasets.Features(
            {
                name: datasets.Value("binary") if isinstance(feature, datasets.Audio) else feature
                for name, feature in inferred.items()
            }
        )
    return datasets.load_dataset(
        builder,
        data_files={split: files},
        split=split,
        streaming=bool(streaming),
        features=features,
        cache_dir=cache_dir,
    )


def _audio_column(features: datasets.Features | None, audio_column: str | None) -> str:
    """
    The requested column, else the only `Audio` column, else the only column named like an audio file extension (a
    webdataset's, read as bytes by `load_audio_source`), else "audio".
    """
    if features is None:
        return audio_column or "audio"
    if audio_column is None:
        audio_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Audio)]
        if not audio_columns:
            audio_columns = [name for name in features if f".{name.lower()}" in AUDIO_EXTENSIONS]
        audio_column = audio_columns[0] if len(audio_columns) == 1 else "audio"
    if audio_column not in features:
        raise ValueError(
            f"The dataset has no audio column {audio_column!r}; its columns are {list(features)}. Pass the column "
            "that holds the audio files as `audio_column`."
        )
    return audio_column


def _undecoded(
    dataset: datasets.Dataset | datasets.IterableDataset, audio_column: str | None
) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """Keep only the audio column, as undecoded bytes/paths: `soundfile` decodes them, not torchcodec."""
    column = _audio_column(dataset.features, audio_column)
    dataset = dataset.select_columns([column]).with_format(None)
    if dataset.features is not None and isinstance(dataset.features[column], datasets.Audio):
        if isinstance(dataset, datasets.IterableDataset):
            # Streaming re-encodes each example with the features; an `Audio` feature's encoder needs torchcodec.
            storage = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
            dataset = dataset.cast_column(column, storage)
        else:
            dataset = dataset.cast_column(column, datasets.Audio(decode=False))
    return dataset, column


@dataclass(frozen=True)
class _Clip:
    key: tuple[int, ...]  # where the clip sits in its source; seeds its crops
    clip_id: str
    value: object  # bytes, a path, a datasets audio value {"bytes", "path"}, or None (a null cell of a dataset)


def _audio_value(value: object) -> object:
    """The clip's audio to decode; a null audio cell is undecodable, like a row with neither bytes nor a path."""
    if value is None:
        raise AudioDecodeError("the row's audio cell is null")
    return value


class _IndexedClips:
    """Clips with random access: each epoch is a permutation dealt round-robin to the consumers."""

    def __init__(self, items: Sequence, column: str | None = None):
        self.items = items
        self.column = column

    @property
    def num_clips(self) -> int:
        return len(self.items)

    def _clip(self, index: int) -> _Clip:
        if self.column is None:
            return _Clip((index,), os.fspath(self.items[index]), self.items[index])
        return _Clip((index,), str(index), self.items[index][self.column])

    def iter_epoch(self, seed: int, epoch: int, shuffle: bool, consumer: int, num_consumers: int) -> Iterator[_Clip]:
        size = self.num_clips
        order = np.random.default_rng([seed, epoch]).permutation(size) if shuffle else np.arange(size)
        for index in order[consumer::num_consumers].tolist():
            yield self._clip(index)


class _StreamedClips:
    """
    Clips of a sharded stream. Every epoch deals the permuted shards to the consumers (whole shards when there are at
    least as many shards as consumers, else all of them to every consumer, which keeps every n-th clip) and passes
    each consumer's clips through the `datasets` shuffle buffer, seeded per epoch: clips of different shards and of
    different parts of a shard meet in a batch, and a clip's batch-mates change from epoch to epoch.
    """

    def __init__(self, dataset: datasets.IterableDataset, column: str, shuffle_buffer_size: int):
        self.dataset = dataset
        self.column = column
        self.shuffle_buffer_size = shuffle_buffer_size

    @property
    def num_clips(self) -> int | None:
        """As declared by the dataset card (summed over the splits of `"a+b"`), `None` when unknown."""
        declared = self.dataset.info.splits or {}
        names = str(self.dataset.split).split("+") if self.dataset.split is not None else []
        if names and all(name in declared and declared[name].num_examples for name in names):
            return sum(declared[name].num_examples for name in names)
        return None

    def _keyed_shard(self, shard: int) -> datasets.IterableDataset:
        """One shard whose rows carry their place in it: it seeds their crops and names them, wherever they go."""
        rows = self.dataset.shard(num_shards=self.dataset.num_shards, index=shard)
        return rows.map(lambda _, row: {_SHARD_KEY: shard, _ROW_KEY: row}, with_indices=True)

    def iter_epoch(self, seed: int, epoch: int, shuffle: bool, consumer: int, num_consumers: int) -> Iterator[_Clip]:
        num_shards = self.dataset.num_shards
        order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
        shared = num_shards < num_consumers
        shards = order if shared else order[consumer::num_consumers]
        stream = datasets.concatenate_datasets([self._keyed_shard(shard) for shard in shards.tolist()])
        if shuffle and self.shuffle_buffer_size > 1:
            # The same seed in every consumer: a shared stream is shuffled alike everywhere, so that keeping every
            # n-th clip still gives each clip to exactly one consumer.
            stream = stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
            stream.set_epoch(epoch)
        for position, clip in enumerate(self._clips(stream)):
            if not shared or position % num_consumers == consumer:
                yield clip

    def iter_in_order_from(self, shard: int, row: int) -> Iterator[_Clip]:
        """
        The clips in the source's order (shards in order, no shuffling) from row `row` of shard `shard` on, without
        reading the shards before it: where a stopped pass over the source resumes.
        """
        stream = datasets.concatenate_datasets(
            [self._keyed_shard(index) for index in range(shard, self.dataset.num_shards)]
        )
        return itertools.islice(self._clips(stream), row, None)

    def _clips(self, stream: datasets.IterableDataset) -> Iterator[_Clip]:
        # `iter` rather than `for row in stream`: in a DataLoader worker, the latter splits the shards among the
        # workers once more.
        for row in stream.iter(batch_size=1):
            shard, index = row[_SHARD_KEY][0], row[_ROW_KEY][0]
            yield _Clip((shard, index), f"{shard}/{index}", row[self.column][0])


def _open_clips(
    source: AudioSource, audio_column: str | None, shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE
) -> _IndexedClips | _StreamedClips:
    """
    The clips of an audio source, in the order of the source. Files are named by their absolute, normalised paths: the
    same files have the same clip ids (and a log-mel cache build the same identity) however they were spelled and from
    whatever working directory.
    """
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        dataset, column = _undecoded(source, audio_column)
        if isinstance(dataset, datasets.IterableDataset):
            return _StreamedClips(dataset, column, shuffle_buffer_size)
        return _IndexedClips(dataset, column)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        for index, path in enumerate(source):
            if not isinstance(path, (str, os.PathLike)):  # bytes would be read as a file's content, arrays fail later
                raise TypeError(
                    f"Expected `source` as a list of audio file paths (str or PathLike), but item {index} is a "
                    f"{type(path).__name__}: decode byte paths with os.fsdecode, and put audio content in a "
                    "`datasets.Dataset` column."
                )
        return _IndexedClips([os.path.abspath(path) for path in source])
    raise TypeError(
        "Expected `source` as a list of audio file paths, a `datasets.Dataset` or a `datasets.IterableDataset`, got "
        f"{type(source).__name__}."
    )


class MatpacPretrainingDataset(torch.utils.data.IterableDataset):
    """
    Normalised log-mel crops `(80, num_frames)` for MATPAC pre-training: one random crop per clip and epoch.

    Yields dicts with `input_values` (float32 `(80, num_frames)`), `num_skipped_short` and `num_skipped_corrupt` (clips
    skipped since this consumer's previous example) and `clip_id` (an absolute file path, a row index, or
    `"shard/row"`). See the module docstring for how epochs are split among processes and DataLoader workers.

    Args:
        source (list of paths, `datasets.Dataset` or `datasets.IterableDataset`):
            Audio files, or a dataset with a column of audio files (bytes or paths; not decoded by `datasets`), for
            instance from `load_audio_source`. A streamed dataset must not be split by node already.
        audio_column (`str`, *optional*):
            The dataset's audio column; defaults to its only `Audio` column, else its only column named like an audio
            file extension (webdataset), else "audio".
        feature_extractor (`MatpacFeatureExtractor`, *optional*):
            Log-mel settings and normalisation statistics; defaults to MATPAC's.
        num_frames (`int`, *optional*, defaults to 608):
            Frames per crop; a crop has `n_fft + (num_frames - 1) * hop_length` samples at 16 kHz.
        seed (`int`, *optional*, defaults to 0):
            Seeds the order of every epoch and every crop.
        shuffle (`bool`, *optional*, defaults to `True`):
            Whether to permute the clips at every epoch (for a stream: the shards, then each consumer's clips through
            a shuffle buffer).
        shuffle_buffer_size (`int`, *optional*, defaults to 1000):
            Clips in each consumer's shuffle buffer of a streamed source; 1 turns the buffer off. A larger buffer mixes
            more widely but holds more encoded clips in memory (see `DEFAULT_SHUFFLE_BUFFER_SIZE`).
        infinite (`bool`, *optional*, defaults to `True`):
            Repeat epochs forever (training, with `max_steps`), or stop after the epoch set by `set_epoch`.
        rank (`int`, *optional*, defaults to 0):
            This process's index among the `world_size` processes that each read their own share of the data
            (`training_args.process_index` under `accelerate launch`).
        world_size (`int`, *optional*, defaults to 1):
            Number of processes that each read their own share of the data (1 when accelerate dispatches batches).
    """

    skipped_clip = "undecodable audio clip"  # what the warning calls a clip it skips as corrupt

    def __init__(
        self,
        source: AudioSource,
        audio_column: str | None = None,
        feature_extractor: MatpacFeatureExtractor | None = None,
        num_frames: int = 608,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
    ):
        if shuffle_buffer_size < 1:
            raise ValueError(f"`shuffle_buffer_size` must be at least 1, got {shuffle_buffer_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Expected 0 <= rank < world_size, got rank={rank} and world_size={world_size}.")
        if seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed}.")
        if num_frames < 1:
            raise ValueError(f"`num_frames` must be positive, got {num_frames}.")
        self.feature_extractor = feature_extractor if feature_extractor is not None else MatpacFeatureExtractor()
        if self.feature_extractor.sampling_rate != SAMPLING_RATE:
            raise ValueError(f"The feature extractor must work at {SAMPLING_RATE} Hz, like the crops.")
        self.num_frames = num_frames
        self.crop_length = self.feature_extractor.num_samples(num_frames)
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.epoch = 0
        # The float files whose samples were all read and found to be audio, by clip, in this process: a 10-minute
        # one costs 3x its crop to read whole, so it is read once (about 100 bytes each).
        self._checked_float_clips: set[tuple] = set()

        self._clips = self._open_clips(source, audio_column)
        if isinstance(self._clips, _IndexedClips) and self._clips.num_clips == 0:
            raise ValueError("The audio source is empty: expected at least one clip.")

    def _open_clips(self, source: AudioSource, audio_column: str | None) -> _IndexedClips | _StreamedClips:
        """Where the clips come from and how an epoch is split among consumers; subclasses read other sources."""
        return _open_clips(source, audio_column, self.shuffle_buffer_size)

    @property
    def dataset_size(self) -> int | None:
        """
        Clips per epoch before skipping short and undecodable ones, to convert epochs to steps: exact for files and
        map-style datasets, as declared by the dataset card for a stream, `None` when unknown.
        """
        return self._clips.num_clips

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration starts from (the Trainer calls this through accelerate)."""
        if epoch < 0:
            raise ValueError(f"`epoch` must be non-negative, got {epoch}.")
        self.epoch = epoch

    def _crop(self, clip: _Clip, epoch: int) -> torch.Tensor | None:
        """The normalised log-mel of the clip's crop for `epoch`, or `None` if the clip is shorter than a crop."""
        rng = np.random.default_rng([self.seed, epoch, *clip.key])
        crop = decode_mono_16k_crop(_audio_value(clip.value), self.crop_length, rng)
        if crop is None:
            return None
        # Bad samples anywhere skip the clip in every epoch (as the log-mel cache does), not when a crop meets them.
        if clip.key not in self._checked_float_clips and check_all_samples(clip.value):
            self._checked_float_clips.add(clip.key)
        return self.feature_extractor.normalized_log_mel(crop[None])[0]

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        consumer, num_consumers = self.rank * num_workers + worker_id, self.world_size * num_workers
        if isinstance(self._clips, _StreamedClips) and worker is not None:
            # Like `datasets` does in its own workers: a lock inherited from the parent process can hang remote reads.
            fsspec.asyn.reset_lock()

        warned = set()
        epoch = self.epoch
        short = corrupt = 0
        cropped, empty = False, {"epochs": 0, "short": 0, "corrupt": 0}  # the epochs in a row without a crop
        while True:
            counts = {"crops": 0, "short": 0, "corrupt": 0}  # of this epoch, for the log
            for clip in self._clips.iter_epoch(self.seed, epoch, self.shuffle, consumer, num_consumers):
                try:
                    input_values = self._crop(clip, epoch)
                    if input_values is not None and not torch.isfinite(input_values).all():
                        raise AudioDecodeError("its log-mel crop has NaN or infinite values")
                except AudioDecodeError as error:
                    corrupt += 1
                    counts["corrupt"] += 1
                    if clip.clip_id not in warned:
                        warned.add(clip.clip_id)
                        logger.warning(f"Skipping {self.skipped_clip} {clip.clip_id}: {error}")
                    continue
                if input_values is None:
                    short += 1
                    counts["short"] += 1
                    continue
                yield {
                    "input_values": input_values,
                    "num_skipped_short": short,
                    "num_skipped_corrupt": corrupt,
                    "clip_id": clip.clip_id,
                }
                short = corrupt = 0
                counts["crops"] += 1
            logger.debug(
                f"Data consumer {consumer}/{num_consumers} finished epoch {epoch}: {counts['crops']} crops, "
                f"{counts['short']} clips too short, {counts['corrupt']} undecodable."
            )
            if not self.infinite:
                return
            if counts["crops"]:
                cropped, empty = True, dict.fromkeys(empty, 0)
            else:
                empty = {"epochs": empty["epochs"] + 1, **{name: empty[name] + counts[name] for name in SKIPS}}
            if empty["epochs"] == (EMPTY_EPOCHS_AFTER_A_CROP if cropped else EMPTY_EPOCHS_BEFORE_ANY_CROP):
                fewer = ", or fewer processes or workers" if num_consumers > 1 else ""
                raise NoUsableClipError(
                    f"Data consumer {consumer} of {num_consumers} (rank {self.rank} of {self.world_size}, DataLoader "
                    f"worker {worker_id} of {num_workers}) found no usable clip in epochs "
                    f"{epoch - empty['epochs'] + 1} to {epoch} ({empty['short']} shorter than {self.crop_length} "
                    f"samples at 16 kHz, {empty['corrupt']} undecodable): it would loop forever. Use more (or longer) "
                    f"clips{fewer}."
                )
            epoch += 1


def collate_pretraining_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack examples of `MatpacPretrainingDataset` into `input_values` `(batch, 80, num_frames)`."""
    return {"input_values": torch.stack([example["input_values"] for example in examples])}


class SkippedClips:
    """
    Counts the clips the data pipeline skipped beside the batches, not inside them.

    It is the loader's collate function: wherever batches are made (a DataLoader worker, or the main process without
    workers) it takes the skip counts out of the examples, posts the batch's totals on a queue with the batch's number
    in its worker, and collates the rest with `collate_fn`. `totals(num_batches)`, in the main process, sums the
    totals of the first `num_batches` batches of the loader: a DataLoader hands out the batches of an iterable
    dataset's workers in turn (in order, none running dry: the dataset is infinite), so batch `b` is batch
    `b // num_workers` of worker `b % num_workers`. Counters read from the workers themselves would run ahead by the
    batches they have prefetched; these are exact, and the same in every run. A run resumed from a checkpoint gets
    the totals of its first steps back for free: the Trainer replays the loader's first batches to skip them, and
    they are posted again.
    """

    def __init__(self, collate_fn=collate_pretraining_batch, num_workers: int = 0, multiprocessing_context=None):
        self.collate_fn = collate_fn
        self.num_workers = max(num_workers, 1)
        # A `Queue` buffers in the sender: a worker never blocks on it, however seldom the totals are read.
        self._queue = multiprocessing.get_context(multiprocessing_context).Queue()
        self._batches_made = 0  # in the process that makes batches (each worker has its own copy)
        self._posted: dict[tuple[int, int], tuple[int, ...]] = {}  # (worker, its batch) -> counts, not summed yet
        self._summed_batches = 0
        self._sums = [0] * len(SKIP_COUNTERS)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        counts = tuple(sum(example.pop(name, 0) for example in examples) for name in SKIP_COUNTERS)
        worker = torch.utils.data.get_worker_info()
        self._queue.put((worker.id if worker is not None else 0, self._batches_made, counts))
        self._batches_made += 1
        return self.collate_fn(examples)

    def totals(self, num_batches: int, timeout: float = 60.0) -> dict[str, int]:
        """Clips skipped while the first `num_batches` batches were read, by reason (`SKIP_COUNTERS`)."""
        for index in range(self._summed_batches, num_batches):
            key = (index % self.num_workers, index // self.num_workers)
            while key not in self._posted:
                try:  # a worker posts a batch's counts before it hands the batch over: they are on their way
                    worker, batch, counts = self._queue.get(timeout=timeout)
                except queue.Empty:
                    raise RuntimeError("The data pipeline did not report the skip counts of a batch read.") from None
                self._posted[worker, batch] = counts
            self._sums = [total + count for total, count in zip(self._sums, self._posted.pop(key))]
        self._summed_batches = max(self._summed_batches, num_batches)
        return dict(zip(SKIP_COUNTERS, self._sums))


__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioDecodeError",
    "MatpacPretrainingDataset",
    "SKIP_COUNTERS",
    "SkippedClips",
    "collate_pretraining_batch",
    "list_audio_files",
    "load_audio_source",
]
