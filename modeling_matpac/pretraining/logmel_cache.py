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
"""A pre-computed log-mel cache: decode, resample and compute a corpus's log-mels once, then train on crops of them.

Decoding and resampling cost milliseconds of CPU per clip and epoch (more for compressed or long clips), enough to
leave a GPU waiting. Like the authors' pre-processing, `preprocess_to_cache` does that work once: every clip is mixed
to mono, resampled to 16 kHz and turned into its whole normalised log-mel, stored in float16.
`MatpacLogMelCacheDataset` then takes one random crop of `num_frames` frames per clip and epoch straight from the
stored log-mel, with the epoch, rank, worker and skip-count contract of `MatpacPretrainingDataset`.

A crop of the stored log-mel equals the log-mel of the waveform crop that starts at the same frame (each frame only
depends on its own 400 samples), up to float16 rounding (< 1e-3 for normalised values within +-4). Crops therefore
start at multiples of the hop (10 ms) instead of at any sample.

On-disk format (a folder):

- `logmels-XXXXX-of-YYYYY.arrow`: Arrow IPC stream files (the format of the `datasets` cache) of up to `shard_size`
  clips each, in the order of the source, with columns `clip_id` (string: the id `MatpacPretrainingDataset` gives the
  clip), `num_frames` (int32) and `log_mel` (binary: the float16 little-endian bytes of the normalised log-mel,
  `(num_mel_bins, num_frames)` row-major). Raw bytes rather than a list of floats because a crop is then a zero-copy
  view of the memory-mapped file (`np.frombuffer`): no decompression, no per-value conversion, no copy of the
  whole clip. The files are memory-mapped, so a cache larger than memory is read at the speed of the page cache.
- `metadata.json`: the front-end settings the log-mels were computed with (a feature extractor with other settings is
  refused), the crop length clips were kept for, the counts of clips kept and skipped and the shards with their
  clip and byte counts (a truncated shard is named when the cache is opened). It is written last: a folder without
  it is an interrupted build.

A cache is built in a sibling folder `.<name>.building` and renamed into place once complete, so an interrupted or
failed build (with `overwrite=True` too) leaves the previous cache as it was. Each finished shard is recorded there
(`progress.json`: the shards, the source clips read and the counts), so that the same call again, with the same source
and settings, resumes after the last finished shard instead of starting over (a build over AudioSet takes hours); the
resumed cache is byte for byte the one an uninterrupted build writes. A resumed build first reads the last clip the
stopped one recorded again and starts over if it differs: two streams may look alike by name, split and shard count.

The shards are plain Arrow, so `datasets.load_dataset(cache_dir, streaming=True)` (or `load_dataset("arrow",
data_files=...)`) streams them too; `MatpacLogMelCacheDataset` memory-maps a local copy.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers.utils import logging

from ..atomic_write import replace_when_written
from ..audio import SAMPLING_RATE, AudioDecodeError, decode_mono_16k_windows
from ..configuration_matpac import FRONT_END_FIELDS
from ..feature_extraction_matpac import MatpacFeatureExtractor
from .data import (
    AudioSource,
    MatpacPretrainingDataset,
    _audio_value,
    _Clip,
    _IndexedClips,
    _open_clips,
    _StreamedClips,
)


logger = logging.get_logger(__name__)

CACHE_FORMAT = "matpac-logmel-cache"
CACHE_FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PROGRESS_FILE = "progress.json"  # in the building folder only
SHARD_PREFIX = "logmels-"
SHARD_SCHEMA = pa.schema([("clip_id", pa.string()), ("num_frames", pa.int32()), ("log_mel", pa.binary())])
# Frames computed at once: bounds the framed copies of long clips (a frame's log-mel only depends on its samples).
_FRAMES_PER_BLOCK = 8192
# Clips of this many samples at 16 kHz or more (about 9 minutes) are decoded block by block rather than whole: an
# hour-long recording would otherwise take gigabytes at its own rate and channels.
_WINDOWED_CLIP_SAMPLES = 2**23
# A record batch is written once it holds this many clips or bytes (binary arrays have 32-bit offsets).
_ROWS_PER_BATCH = 64
_BYTES_PER_BATCH = 64 * 2**20


def front_end_settings(feature_extractor: MatpacFeatureExtractor) -> dict[str, int | float]:
    """The settings of `feature_extractor` that the log-mels depend on, as stored in a cache's metadata."""
    return {name: getattr(feature_extractor, name) for name in FRONT_END_FIELDS.values()}


def _normalised_log_mel(windows: Iterator[torch.Tensor], extractor: MatpacFeatureExtractor) -> np.ndarray:
    """
    The float16 normalised log-mel `(num_mel_bins, frames)` of a mono 16 kHz clip given as windows of
    `_FRAMES_PER_BLOCK` frames' samples (see `_compute`); a window too short for a frame holds none of the clip's.
    """
    blocks = [
        extractor.normalized_log_mel(samples).to(torch.float16)
        for samples in windows
        if samples.shape[-1] >= extractor.n_fft
    ]
    return torch.cat(blocks, dim=-1).numpy()


def _compute(value: object, extractor: MatpacFeatureExtractor, min_samples: int) -> tuple[str, object]:
    """One clip -> `("ok", float16 log-mel)`, `("short", None)` or `("corrupt", reason)`."""
    hop_length = extractor.hop_length
    try:
        windows = decode_mono_16k_windows(
            _audio_value(value),
            step=_FRAMES_PER_BLOCK * hop_length,
            overlap=extractor.n_fft - hop_length,
            min_samples=min_samples,
            whole_below=_WINDOWED_CLIP_SAMPLES,
        )
        if windows is None:
            return "short", None
        log_mel = _normalised_log_mel(windows, extractor)
    except AudioDecodeError as error:
        return "corrupt", str(error)
    if not np.isfinite(log_mel).all():
        return "corrupt", "its log-mel has NaN or infinite values"
    return "ok", log_mel


_worker_arguments: tuple[MatpacFeatureExtractor, int] | None = None


def _init_worker(extractor: MatpacFeatureExtractor, min_samples: int) -> None:
    global _worker_arguments
    _worker_arguments = (extractor, min_samples)
    # One thread per process, like DataLoader workers: the processes already use every core.
    torch.set_num_threads(1)


def _compute_in_worker(value: object) -> tuple[str, object]:
    return _compute(value, *_worker_arguments)


def _computed_clips(
    clips: Iterator[_Clip], extractor: MatpacFeatureExtractor, min_samples: int, num_workers: int
) -> Iterator[tuple[_Clip, tuple[str, object]]]:
    """`(clip, outcome)` in the order of `clips`, computed by `num_workers` processes, not far ahead of the caller."""
    if num_workers <= 1:
        for clip in clips:
            yield clip, _compute(clip.value, extractor, min_samples)
        return
    # `Pool.imap` would read the whole source into memory ahead of the workers; a bounded queue of tasks does not.
    with multiprocessing.get_context().Pool(num_workers, _init_worker, (extractor, min_samples)) as pool:
        pending = deque()
        for clip in clips:
            pending.append((clip, pool.apply_async(_compute_in_worker, (clip.value,))))
            if len(pending) >= 4 * num_workers:
                clip, result = pending.popleft()
                yield clip, result.get()
        while pending:
            clip, result = pending.popleft()
            yield clip, result.get()


class _ShardWriter:
    """Writes rows into Arrow stream files of `shard_size` rows, named once their number is known (`finish`)."""

    def __init__(self, directory: Path, shard_size: int, shards: list[tuple[Path, int]] | None = None):
        self.directory = directory
        self.shard_size = shard_size
        self.shards: list[tuple[Path, int]] = list(shards or [])  # (path while writing, rows), finished ones first
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._batch: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        self._batch_bytes = 0

    def write(self, clip_id: str, log_mel: np.ndarray) -> bool:
        """Adds a row; True when it completes a shard."""
        if self._writer is None:
            path = self.directory / f"{SHARD_PREFIX}{len(self.shards):05d}.arrow.incomplete"
            self._writer = pa.ipc.new_stream(os.fspath(path), SHARD_SCHEMA)
            self.shards.append((path, 0))
        data = log_mel.astype("<f2", copy=False).tobytes()
        self._batch["clip_id"].append(clip_id)
        self._batch["num_frames"].append(log_mel.shape[-1])
        self._batch["log_mel"].append(data)
        self._batch_bytes += len(data)
        path, rows = self.shards[-1]
        self.shards[-1] = (path, rows + 1)
        if len(self._batch["clip_id"]) >= _ROWS_PER_BATCH or self._batch_bytes >= _BYTES_PER_BATCH:
            self._flush()
        if rows + 1 == self.shard_size:
            self._close_shard()
            return True
        return False

    def _flush(self) -> None:
        if self._batch["clip_id"]:
            self._writer.write_batch(pa.record_batch(list(self._batch.values()), schema=SHARD_SCHEMA))
        self._batch = {name: [] for name in SHARD_SCHEMA.names}
        self._batch_bytes = 0

    def _close_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._writer = None

    def finish(self) -> list[dict[str, str | int]]:
        """Close the last shard and give every shard its final name; returns `{"file", "num_clips"}` per shard."""
        if self._writer is not None:
            self._close_shard()
        shards = []
        for index, (path, rows) in enumerate(self.shards):
            name = f"{SHARD_PREFIX}{index:05d}-of-{len(self.shards):05d}.arrow"
            path.rename(self.directory / name)
            shards.append({"file": name, "num_clips": rows, "num_bytes": (self.directory / name).stat().st_size})
        return shards


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """`output_dir` must be new, empty, or a previous cache to replace (`overwrite`): never files of another kind."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{os.fspath(output_dir)!r} exists and is not a directory.")
    entries = list(output_dir.iterdir()) if output_dir.exists() else []
    ours = [
        path for path in entries if path.name in (METADATA_FILE, PROGRESS_FILE) or path.name.startswith(SHARD_PREFIX)
    ]
    others = sorted(path.name for path in entries if path not in ours)
    if others:
        raise FileExistsError(
            f"{os.fspath(output_dir)!r} holds files that are not part of a log-mel cache ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): give an empty or new directory."
        )
    if ours and not overwrite:
        raise FileExistsError(
            f"{os.fspath(output_dir)!r} already holds a log-mel cache (or an interrupted build of one): pass "
            "`overwrite=True` (`--overwrite_cache`) to replace it, or give another directory."
        )


def _swap_in(built: Path, output_dir: Path) -> None:
    """Replace `output_dir` (a previous cache, or nothing) by the complete cache `built`, a sibling folder."""
    if not output_dir.exists():
        built.rename(output_dir)
        return
    previous = output_dir.with_name(f".{output_dir.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    output_dir.rename(previous)
    built.rename(output_dir)
    shutil.rmtree(previous)


def preprocess_to_cache(
    source: AudioSource,
    output_dir: str | os.PathLike,
    feature_extractor: MatpacFeatureExtractor | None = None,
    min_frames: int = 608,
    shard_size: int = 1024,
    num_workers: int | None = None,
    audio_column: str | None = None,
    overwrite: bool = False,
    description: str | None = None,
) -> dict:
    """
    Decode every clip of an audio source once and store its normalised log-mel in a log-mel cache (see the module
    docstring for the format), for `MatpacLogMelCacheDataset`.

    Clips are mixed to mono, resampled to 16 kHz and turned into their whole log-mel with `feature_extractor`'s
    settings and statistics, then stored in float16. Clips shorter than `min_frames` frames are skipped (without
    decoding them when the header tells their length), undecodable ones are skipped with a warning; both are counted
    in the metadata. The cache's bytes depend only on the source and the arguments (not on `num_workers`).

    Args:
        source (list of paths, `datasets.Dataset` or `datasets.IterableDataset`):
            The clips, as `MatpacPretrainingDataset` takes them (for instance from `load_audio_source`).
        output_dir (`str` or `os.PathLike`):
            Where to write the cache: a new or empty directory, or a previous cache with `overwrite=True`.
        feature_extractor (`MatpacFeatureExtractor`, *optional*):
            Log-mel settings and normalisation statistics; defaults to MATPAC's.
        min_frames (`int`, *optional*, defaults to 608):
            Clips with fewer frames are skipped: the crop length training will use.
        shard_size (`int`, *optional*, defaults to 1024):
            Clips per shard file (about 160 MB of 10 s clips).
        num_workers (`int`, *optional*):
            Processes that decode in parallel; in this process when `None` or 1.
        audio_column (`str`, *optional*):
            The dataset's audio column, as for `MatpacPretrainingDataset`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a cache already in `output_dir`.
        description (`str`, *optional*):
            What the source is, kept in the metadata (for model cards).

    Returns:
        `dict`: the cache's metadata, as written to `metadata.json`.
    """
    extractor = feature_extractor if feature_extractor is not None else MatpacFeatureExtractor()
    if extractor.sampling_rate != SAMPLING_RATE:
        raise ValueError(f"The feature extractor must work at {SAMPLING_RATE} Hz, got {extractor.sampling_rate}.")
    for name, value in [("min_frames", min_frames), ("shard_size", shard_size), ("num_workers", num_workers or 1)]:
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    clips = _open_clips(source, audio_column)
    # The real folder (a link's target), built beside it on the same disk: it is swapped in by renaming folders.
    output_dir = Path(output_dir).resolve()
    if output_dir == Path.cwd() or output_dir in Path.cwd().parents:
        raise ValueError(
            f"{os.fspath(output_dir)!r} is the current directory or holds it: the cache replaces its folder when it "
            "is complete; give a folder inside it instead (for instance ./logmels)."
        )
    _check_output_dir(output_dir, overwrite)
    # Built next to `output_dir` and swapped in once complete: a failed or killed build leaves the previous cache.
    building = output_dir.with_name(f".{output_dir.name}.building")
    building.mkdir(parents=True, exist_ok=True)
    try:
        metadata = _build(clips, building, extractor, min_frames, shard_size, num_workers, description)
    except BaseException:
        if (building / PROGRESS_FILE).exists():
            logger.warning(
                f"The build stopped: its finished shards stay in {os.fspath(building)}, and the same call resumes "
                "after them."
            )
        else:
            shutil.rmtree(building, ignore_errors=True)
        raise
    # The progress file goes last: a build stopped while it was swapped in is resumed (with nothing left to compute)
    # and swapped in by the same call, not started over.
    _swap_in(building, output_dir)
    (output_dir / PROGRESS_FILE).unlink(missing_ok=True)
    shards = metadata["shards"]
    logger.info(
        f"Wrote the log-mels of {metadata['num_clips']} clips ({metadata['num_frames'] / 360_000:.1f} h, "
        f"{sum(shard['num_bytes'] for shard in shards) / 1e9:.2f} GB in {len(shards)} shards) to "
        f"{os.fspath(output_dir)}; skipped {metadata['num_skipped_short']} clips shorter than {min_frames} frames and "
        f"{metadata['num_skipped_corrupt']} undecodable ones."
    )
    return metadata


def _source_identity(clips: _IndexedClips | _StreamedClips) -> str:
    """
    A hash of what identifies the source's clips and their order: the file list (absolute paths, as `_open_clips` gives
    them, so that the same files spelled otherwise are the same source, with their sizes and modification times, so
    that files written again are not), a dataset's fingerprint, or a stream's name, config, split and shards. A stopped
    build resumes only from the same identity.
    """
    if isinstance(clips, _IndexedClips) and clips.column is None:
        parts = ["files", *(_file_signature(item) for item in clips.items)]
    elif isinstance(clips, _IndexedClips):
        parts = ["dataset", getattr(clips.items, "_fingerprint", None), len(clips.items), clips.column]
    else:
        info, dataset = clips.dataset.info, clips.dataset
        parts = ["stream", info.dataset_name, info.config_name, dataset.split, dataset.num_shards, clips.column]
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()


def _file_signature(path: str | os.PathLike) -> str:
    try:
        status = os.stat(path)
    except OSError:
        return f"{os.fspath(path)}\tunreadable"
    return f"{os.fspath(path)}\t{status.st_size}\t{status.st_mtime_ns}"


def _why_not_resumed(building: Path, done: dict, identity: dict) -> str | None:
    """Why the stopped build `done` in `building` cannot go on as the build of `identity`; `None` when it can."""
    recorded = done.get("identity") or {}
    if recorded.get("source") != identity["source"]:
        return "it read another source, or files of the source changed since"
    settings = [
        f"{name} {recorded.get(name)!r} then, {identity.get(name)!r} now"
        for name in sorted(recorded.keys() | identity.keys())
        if name != "source" and recorded.get(name) != identity.get(name)
    ]
    if settings:
        return f"it had other settings ({'; '.join(settings)})"
    missing = [name for name, _ in done["shards"] if not (building / name).is_file()]
    if missing:
        return f"its shard files {missing} are missing"
    return None


def _drop_finished_part(building: Path, done: dict, reason: str) -> None:
    """Says what of a stopped build is thrown away and why: hours of work may go."""
    logger.warning(
        f"Dropping the stopped build in {os.fspath(building)} because {reason}: its finished shards are deleted "
        f"(shards done: {len(done['shards'])}, clips kept: {done['counts']['kept']}, clips of the source read: "
        f"{done['read']}). Starting over."
    )


def _restore_shard_names(building: Path, done: dict) -> None:
    """
    A build stopped while it gave its shards their final names (before its metadata was written): the shards its
    progress records get their names back, so that they are kept.
    """
    for name, _ in done["shards"]:
        index = name.removeprefix(SHARD_PREFIX).removesuffix(".arrow.incomplete")
        renamed = list(building.glob(f"{SHARD_PREFIX}{index}-of-*.arrow"))
        if not (building / name).exists() and len(renamed) == 1:
            renamed[0].rename(building / name)


def _finished_part(building: Path, identity: dict | None) -> dict:
    """
    What a stopped build of the same `identity` finished in `building` (its shards, counts and source clips read),
    with every other file removed; an empty start when there is none (always for `identity=None`, with no warning:
    the caller gives the reason). A stopped build of another identity is dropped with a warning.
    """
    progress_path = building / PROGRESS_FILE
    done = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if done is not None:
        _restore_shard_names(building, done)
    if done is not None and identity is not None:
        reason = _why_not_resumed(building, done, identity)
        if reason is not None:
            _drop_finished_part(building, done, reason)
            done = None
    if done is None or identity is None:
        done = {"shards": [], "counts": {"kept": 0, "short": 0, "corrupt": 0, "frames": 0}, "read": 0, "last": None}
    keep = {name for name, _ in done["shards"]} | ({PROGRESS_FILE} if done["read"] else set())
    for path in building.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return done


def _record_finished_part(
    building: Path, identity: dict, shards: list[tuple[Path, int]], counts: dict, read: int, last: _Clip
) -> None:
    """
    Records the finished shards (all of `shards`: the last one was just closed), the counts, the number of source
    clips read and the key of the last one.
    """
    shard_rows = [[path.name, rows] for path, rows in shards]
    progress = {
        "identity": identity,
        "shards": shard_rows,
        "counts": counts,
        "read": read,
        "last": list(last.key),
        "last_digest": _clip_digest(last),
    }
    with replace_when_written(building / PROGRESS_FILE) as partial:
        partial.write_text(json.dumps(progress, indent=2) + "\n")


def _clip_digest(clip: _Clip) -> str:
    """A hash of what the clip is: its bytes where the source holds them, else its path."""
    value = clip.value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    data = value if isinstance(value, bytes) else os.fspath(value or "").encode()
    return hashlib.sha256(data).hexdigest()


def _clips_from_last(clips: _IndexedClips | _StreamedClips, read: int, last: list[int] | None) -> Iterator[_Clip]:
    """
    The source's clips in order, from the last of the first `read` (keyed `last`) on, that clip included, so that a
    resumed build can check it is the one it recorded: by index where the source has random access, from the shard of
    `last` in a stream (the shards before it are not read again). All of them when nothing was read.
    """
    if isinstance(clips, _IndexedClips):
        return (clips._clip(index) for index in range(max(read - 1, 0), clips.num_clips))
    if last is None:
        return clips.iter_epoch(seed=0, epoch=0, shuffle=False, consumer=0, num_consumers=1)
    return clips.iter_in_order_from(*last)


def _resumed_clips(clips: _IndexedClips | _StreamedClips, building: Path, done: dict) -> tuple[dict, Iterator[_Clip]]:
    """
    The finished part to keep and the clips still to read. A source whose clip at the recorded place is not the one
    recorded there is another source that looks alike (two streams of equal name, split and shard count): its build
    starts over, with every file of the stopped one removed.
    """
    remaining = _clips_from_last(clips, done["read"], done["last"])
    if not done["read"]:
        return done, remaining
    last = next(remaining, None)
    if last is not None and list(last.key) == done["last"] and _clip_digest(last) == done.get("last_digest"):
        return done, remaining
    _drop_finished_part(
        building, done, "it read another source (its last recorded clip differs from this source's clip there)"
    )
    return _finished_part(building, None), _clips_from_last(clips, 0, None)


def _build(
    clips: _IndexedClips | _StreamedClips,
    output_dir: Path,
    extractor: MatpacFeatureExtractor,
    min_frames: int,
    shard_size: int,
    num_workers: int | None,
    description: str | None,
) -> dict:
    """
    Writes the shards and then the metadata of a cache into the building folder `output_dir`, after the shards that a
    stopped build of the same source and settings finished there.
    """
    min_samples = extractor.num_samples(min_frames)
    identity = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": _source_identity(clips),
        "front_end": front_end_settings(extractor),
        "min_frames": min_frames,
        "shard_size": shard_size,
    }
    done, remaining = _resumed_clips(clips, output_dir, _finished_part(output_dir, identity))
    writer = _ShardWriter(output_dir, shard_size, [(output_dir / name, rows) for name, rows in done["shards"]])
    counts, read = done["counts"], done["read"]
    if read:
        logger.info(
            f"Resuming the stopped build in {os.fspath(output_dir)} after its last finished shard (shards done: "
            f"{len(writer.shards)}, clips kept: {counts['kept']}, clips of the source read: {read})."
        )
    progress = logging.tqdm(total=clips.num_clips, initial=read, desc="Computing log-mels", unit="clip")
    for clip, (outcome, result) in _computed_clips(remaining, extractor, min_samples, num_workers or 1):
        read += 1
        if outcome == "ok":
            counts["kept"] += 1
            counts["frames"] += result.shape[-1]
            if writer.write(clip.clip_id, result):
                _record_finished_part(output_dir, identity, writer.shards, counts, read, clip)
        elif outcome == "short":
            counts["short"] += 1
        else:
            counts["corrupt"] += 1
            logger.warning(f"Skipping undecodable audio clip {clip.clip_id}: {result}")
        progress.update()
        progress.set_postfix(short=counts["short"], corrupt=counts["corrupt"], refresh=False)
    progress.close()
    shards = writer.finish()
    if counts["kept"] == 0:
        raise ValueError(
            f"No clip of the source is usable: {counts['short']} shorter than {min_frames} frames "
            f"({min_samples} samples at 16 kHz), {counts['corrupt']} undecodable. Nothing was written."
        )

    metadata = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "description": description,
        "front_end": front_end_settings(extractor),
        "dtype": "float16",
        "min_frames": min_frames,
        "num_clips": counts["kept"],
        "num_frames": counts["frames"],
        "num_skipped_short": counts["short"],
        "num_skipped_corrupt": counts["corrupt"],
        "shards": shards,
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


class LogMelCache:
    """
    A log-mel cache written by `preprocess_to_cache`, opened for random access: `cache[index]` is `(clip_id, log_mel)`
    with `log_mel` a read-only float16 `(num_mel_bins, num_frames)` view of the memory-mapped shard.

    Shards are mapped on first use in each process, so the object is cheap to pickle into DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.metadata = self._read_metadata(self.directory)
        self.shard_files = [self.directory / shard["file"] for shard in self.metadata["shards"]]
        missing = [path.name for path in self.shard_files if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"The log-mel cache {os.fspath(self.directory)!r} lacks shards listed in its metadata: {missing}."
            )
        for shard, path in zip(self.metadata["shards"], self.shard_files):
            size = path.stat().st_size
            if "num_bytes" in shard and size != shard["num_bytes"]:
                raise ValueError(
                    f"The log-mel cache shard {os.fspath(path)} has {size:,} bytes, not the {shard['num_bytes']:,} "
                    "its metadata records: it is truncated or was modified. Rebuild the cache (`--preprocess_to` with "
                    "`--overwrite_cache`)."
                )
        self._shard_sizes = [shard["num_clips"] for shard in self.metadata["shards"]]
        self._offsets = np.cumsum([0, *self._shard_sizes])
        self._tables: dict[int, pa.Table] = {}
        self._build = self._build_signature()

    def _build_signature(self) -> tuple[int, int, int]:
        """Which build the folder holds: a rebuild swaps in a new folder, with a new metadata file."""
        status = (self.directory / METADATA_FILE).stat()
        return status.st_dev, status.st_ino, status.st_mtime_ns

    @staticmethod
    def _read_metadata(directory: Path) -> dict:
        path = directory / METADATA_FILE
        if not path.is_file():
            building = directory.with_name(f".{directory.name}.building")
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"Log-mel cache {os.fspath(directory)!r} does not exist or is not a directory"
                    + (
                        f" (a stopped build of it is in {os.fspath(building)}: run the same build again to finish it)"
                        if (building / PROGRESS_FILE).is_file()
                        else ""
                    )
                    + "."
                )
            interrupted = any(entry.name.startswith(SHARD_PREFIX) for entry in directory.iterdir())
            raise FileNotFoundError(
                f"{os.fspath(directory)!r} is not a log-mel cache: it has no {METADATA_FILE}"
                + (", so its build was interrupted; build it again" if interrupted else "")
                + ". Build one with `preprocess_to_cache` or `run_pretraining.py --preprocess_to`."
            )
        try:
            metadata = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({error}): rebuild the cache.") from None
        if metadata.get("format") != CACHE_FORMAT or metadata.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)} is not the metadata of a version {CACHE_FORMAT_VERSION} {CACHE_FORMAT}: found "
                f"format {metadata.get('format')!r} version {metadata.get('format_version')!r}. Rebuild the cache."
            )
        missing = [key for key in ("front_end", "min_frames", "num_clips", "shards") if key not in metadata]
        if missing:
            raise ValueError(f"{os.fspath(path)} lacks {', '.join(missing)}: rebuild the cache.")
        shards = metadata["shards"]
        if not isinstance(shards, list) or not all(
            isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("num_clips"), int)
            for shard in shards
        ):
            raise ValueError(f"{os.fspath(path)} does not list its shards as {{file, num_clips}}: rebuild the cache.")
        # Checked against the sum of the shards' counts here, and each count against its shard's rows when the shard
        # is first read (`_table`): Arrow stream files have no footer, so counting their rows means reading every
        # record batch of every shard, thousands of files for a large corpus.
        total = sum(shard["num_clips"] for shard in shards)
        if metadata["num_clips"] != total:
            raise ValueError(
                f"{os.fspath(path)} says num_clips={metadata['num_clips']!r}, but its {len(shards)} shards hold "
                f"{total} clips: it was modified. Rebuild the cache."
            )
        return metadata

    def __len__(self) -> int:
        return self.metadata["num_clips"]

    @property
    def num_mel_bins(self) -> int:
        return self.metadata["front_end"]["feature_size"]

    def check_feature_extractor(self, feature_extractor: MatpacFeatureExtractor) -> None:
        """Refuse a feature extractor whose log-mels differ from the cached ones."""
        cached, wanted = self.metadata["front_end"], front_end_settings(feature_extractor)
        different = [
            f"{name}={cached.get(name)!r} (cache) vs {value!r}"
            for name, value in wanted.items()
            if cached.get(name) != value
        ]
        if different:
            raise ValueError(
                f"The log-mel cache {os.fspath(self.directory)!r} was computed with another front end than the "
                f"feature extractor's: {', '.join(different)}. Rebuild the cache with this feature extractor "
                "(`run_pretraining.py --preprocess_to` with the same model config) or train with the cache's settings."
            )

    def _table(self, shard: int) -> pa.Table:
        if shard not in self._tables:
            try:
                rebuilt = self._build_signature() != self._build
            except OSError:
                rebuilt = True
            if rebuilt:  # the shards opened so far stay mapped; the others would be another build's
                raise ValueError(
                    f"The log-mel cache {os.fspath(self.directory)!r} was rebuilt or removed while this run read it. "
                    "Resume the run from its last checkpoint (`--resume_from_checkpoint last`) to read the new one."
                )
            try:
                with pa.memory_map(os.fspath(self.shard_files[shard])) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except (pa.ArrowException, OSError) as error:
                raise ValueError(
                    f"The log-mel cache shard {self.shard_files[shard]} cannot be read ({error}): rebuild the cache."
                ) from None
            if table.schema != SHARD_SCHEMA or table.num_rows != self._shard_sizes[shard]:
                raise ValueError(
                    f"The shard {self.shard_files[shard]} does not match the metadata of its cache ({table.num_rows} "
                    f"rows, {self._shard_sizes[shard]} expected; schema {table.schema}): rebuild the cache."
                )
            self._tables[shard] = table
        return self._tables[shard]

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"Clip {index} out of range for a log-mel cache of {len(self)} clips.")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        table, row = self._table(shard), index - int(self._offsets[shard])
        num_frames = table.column("num_frames")[row].as_py()
        data = table.column("log_mel")[row].as_buffer()
        if data.size != 2 * self.num_mel_bins * num_frames:
            raise ValueError(
                f"Clip {index} of the log-mel cache {os.fspath(self.directory)!r} has {data.size} bytes, not the "
                f"{2 * self.num_mel_bins * num_frames} of {self.num_mel_bins} x {num_frames} float16 values: rebuild "
                "the cache."
            )
        log_mel = np.frombuffer(data, dtype="<f2").reshape(self.num_mel_bins, num_frames)
        log_mel.flags.writeable = False
        return table.column("clip_id")[row].as_py(), log_mel

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": {}}


class _CachedClips(_IndexedClips):
    """The clips of a log-mel cache, dealt to consumers like files; a clip's value is its log-mel."""

    def _clip(self, index: int) -> _Clip:
        clip_id, log_mel = self.items[index]
        return _Clip((index,), clip_id, log_mel)


class MatpacLogMelCacheDataset(MatpacPretrainingDataset):
    """
    Normalised log-mel crops `(80, num_frames)` for MATPAC pre-training, read from a log-mel cache written by
    `preprocess_to_cache`: one random crop per clip and epoch, at a whole frame, reproducible from `(seed, epoch,
    clip)`.

    Yields the dicts of `MatpacPretrainingDataset` (float32 `input_values`, `num_skipped_short`,
    `num_skipped_corrupt`, `clip_id`) and splits epochs among processes and DataLoader workers the same way. Clips were
    filtered when the cache was built, so only clips shorter than a `num_frames` above the cache's `min_frames` are
    skipped (and counted) here.

    Args:
        cache_dir (`str` or `os.PathLike`):
            The cache's directory.
        feature_extractor (`MatpacFeatureExtractor`, *optional*):
            The front end the model expects; refused if the cache was computed with other settings. Defaults to
            MATPAC's.
        num_frames, seed, shuffle, infinite, rank, world_size:
            As for `MatpacPretrainingDataset`.
    """

    skipped_clip = "the damaged cached log-mel (rebuild the cache to use it again) of"

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        feature_extractor: MatpacFeatureExtractor | None = None,
        num_frames: int = 608,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(
            cache_dir,
            feature_extractor=feature_extractor,
            num_frames=num_frames,
            seed=seed,
            shuffle=shuffle,
            infinite=infinite,
            rank=rank,
            world_size=world_size,
        )

    def _open_clips(self, source: str | os.PathLike, audio_column: str | None) -> _CachedClips:
        self.cache = LogMelCache(source)
        self.cache.check_feature_extractor(self.feature_extractor)
        if self.num_frames > self.cache.metadata["min_frames"]:
            logger.info(
                f"Crops of {self.num_frames} frames from a cache of clips of at least "
                f"{self.cache.metadata['min_frames']}: shorter clips will be skipped."
            )
        return _CachedClips(self.cache)

    @property
    def description(self) -> str:
        """What the cache was computed from, for logs and model cards."""
        source = self.cache.metadata.get("description") or "audio"
        return f"{source}, log-mels cached in {os.fspath(self.cache.directory)}"

    def _crop(self, clip: _Clip, epoch: int) -> torch.Tensor | None:
        """A random `num_frames` crop of the clip's cached log-mel for `epoch`, or `None` if the clip is shorter."""
        log_mel = clip.value
        if log_mel.shape[-1] < self.num_frames:
            return None
        rng = np.random.default_rng([self.seed, epoch, *clip.key])
        start = int(rng.integers(log_mel.shape[-1] - self.num_frames + 1))
        # A float32 copy: the log-mel is a read-only view of the memory-mapped shard.
        return torch.tensor(log_mel[:, start : start + self.num_frames], dtype=torch.float32)


__all__ = ["LogMelCache", "MatpacLogMelCacheDataset", "front_end_settings", "preprocess_to_cache"]
