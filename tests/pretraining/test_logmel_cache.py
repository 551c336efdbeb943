"""Tests of the log-mel cache: building, reading crops, skipping, front-end checks, sharding and the script."""

import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch
from conftest import tiny_config_kwargs
from torch.utils.data import DataLoader

from modeling_matpac.audio import decode_mono_16k
from modeling_matpac.feature_extraction_matpac import MatpacFeatureExtractor
from modeling_matpac.pretraining import data as data_module
from modeling_matpac.pretraining import logmel_cache
from modeling_matpac.pretraining.data import list_audio_files
from modeling_matpac.pretraining.logmel_cache import LogMelCache, MatpacLogMelCacheDataset, preprocess_to_cache


sys.path.insert(0, str(Path(__file__).parents[2]))
import run_pretraining  # noqa: E402


CROP = 97_520  # 400 + 607 * 160 samples: exactly 608 frames
FLOAT16_TOLERANCE = 2e-3  # float16 rounding of normalised log-mels, which stay within [-4, 4]
TINY = ",".join(f"{name}={value}" for name, value in tiny_config_kwargs().items())


def _write(path: Path, num_samples: int, sampling_rate: int = 16000, num_channels: int = 1, seed: int = 0) -> Path:
    """Noise plus a tone, clipped to [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * rng.uniform(200, 2000) * np.arange(num_samples) / sampling_rate)
    audio = np.clip(0.3 * tone[:, None] + 0.1 * rng.standard_normal((num_samples, num_channels)), -0.6, 0.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), sampling_rate)
    return path


def _log_mel(extractor: MatpacFeatureExtractor, waveform: torch.Tensor) -> torch.Tensor:
    return extractor(waveform.numpy(), sampling_rate=16000, return_tensors="pt")["input_values"][0]


@pytest.fixture(scope="module")
def extractor() -> MatpacFeatureExtractor:
    return MatpacFeatureExtractor()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("corpus")
    return [
        _write(directory / "a_16k.wav", 112_000, seed=1),
        _write(directory / "b_44k_stereo.flac", 300_000, 44100, num_channels=2, seed=2),
        _write(directory / "c_22k.wav", 160_000, 22050, seed=3),
    ]


@pytest.fixture(scope="module")
def cache_dir(corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("caches") / "logmels"
    preprocess_to_cache(corpus, directory, shard_size=2)
    return directory


# ---------------------------------------------------------------------------------------------------------------------
# Round trip


def test_cached_crops_are_log_mels_of_waveform_crops_starting_at_a_frame(corpus, cache_dir, extractor):
    dataset = MatpacLogMelCacheDataset(cache_dir, shuffle=False, infinite=False)
    assert dataset.dataset_size == 3
    examples = list(dataset)
    assert [example["clip_id"] for example in examples] == [str(path) for path in corpus]

    starts = []
    for index, (example, path) in enumerate(zip(examples, corpus, strict=True)):
        crop = example["input_values"]
        assert crop.shape == (80, 608) and crop.dtype == torch.float32
        assert example["num_skipped_short"] == example["num_skipped_corrupt"] == 0
        waveform = decode_mono_16k(path)
        whole = _log_mel(extractor, waveform)
        clip_id, stored = LogMelCache(cache_dir)[index]
        assert clip_id == str(path) and stored.dtype == np.float16 and stored.shape == whole.shape
        torch.testing.assert_close(torch.from_numpy(stored.astype(np.float32)), whole, atol=FLOAT16_TOLERANCE, rtol=0)

        # The documented draw: any of the clip's frames - 608 + 1 starts, seeded by (seed, epoch, clip index).
        start = int(np.random.default_rng([dataset.seed, 0, index]).integers(whole.shape[1] - 608 + 1))
        direct = _log_mel(extractor, waveform[start * 160 : start * 160 + CROP])
        torch.testing.assert_close(crop, direct, atol=FLOAT16_TOLERANCE, rtol=0)
        starts.append(start)
    assert any(starts)  # random crops, not the clips' beginnings


def test_long_clips_are_computed_in_blocks_of_frames(corpus, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(logmel_cache, "_FRAMES_PER_BLOCK", 100)
    preprocess_to_cache(corpus, tmp_path / "blocks")
    for index in range(len(corpus)):
        blocks, whole = LogMelCache(tmp_path / "blocks")[index][1], LogMelCache(cache_dir)[index][1]
        np.testing.assert_allclose(blocks.astype(np.float32), whole.astype(np.float32), atol=1e-3, rtol=0)


def test_long_clips_are_decoded_window_by_window(corpus, cache_dir, tmp_path, monkeypatch):
    """
    Before, each clip was decoded whole: a 20-minute 48 kHz stereo file took 1.55 GB. Above the threshold (lowered
    here), a clip is read a block of frames at a time, with the same log-mels up to float rounding.
    """
    from modeling_matpac import audio

    reads, read_window = [], audio._read_mono_16k_window

    def counting_read(sound_file, start, num_samples):
        reads.append((start, num_samples))
        return read_window(sound_file, start, num_samples)

    monkeypatch.setattr(audio, "_read_mono_16k_window", counting_read)
    monkeypatch.setattr(logmel_cache, "_FRAMES_PER_BLOCK", 100)
    monkeypatch.setattr(logmel_cache, "_WINDOWED_CLIP_SAMPLES", 100_000)
    preprocess_to_cache(corpus, tmp_path / "windows")
    # The 16 kHz clip (112,000 samples) and the 44.1 kHz one (108,844 at 16 kHz) are read in windows of 100 frames
    # (16,000 samples) plus the 240 of the last frame; the 22.05 kHz one (116,100) too: all three are long here.
    lengths = [112_000, 108_844, 116_100]
    expected = [(first, min(16_240, length - first)) for length in lengths for first in range(0, length - 240, 16_000)]
    assert sorted(reads) == sorted(expected)
    for index in range(len(corpus)):
        windows, whole = LogMelCache(tmp_path / "windows")[index][1], LogMelCache(cache_dir)[index][1]
        assert windows.shape == whole.shape
        np.testing.assert_allclose(windows.astype(np.float32), whole.astype(np.float32), atol=1e-3, rtol=0)


def test_crops_depend_only_on_seed_epoch_and_clip(cache_dir):
    def epoch_crops(seed: int, epoch: int) -> dict[str, torch.Tensor]:
        dataset = MatpacLogMelCacheDataset(cache_dir, seed=seed, infinite=False)
        dataset.set_epoch(epoch)
        return {example["clip_id"]: example["input_values"] for example in dataset}

    reference = epoch_crops(seed=0, epoch=1)
    again, next_epoch, other_seed = epoch_crops(0, 1), epoch_crops(0, 2), epoch_crops(1, 1)
    assert all(torch.equal(crop, again[clip_id]) for clip_id, crop in reference.items())
    assert any(not torch.equal(crop, next_epoch[clip_id]) for clip_id, crop in reference.items())
    assert any(not torch.equal(crop, other_seed[clip_id]) for clip_id, crop in reference.items())


def test_the_cache_streams_with_datasets(cache_dir):
    stream = datasets.load_dataset(str(cache_dir), streaming=True, split="train")
    assert stream.num_shards == 2
    cache = LogMelCache(cache_dir)
    rows = list(stream)
    assert len(rows) == len(cache) == 3
    for index, row in enumerate(rows):
        clip_id, log_mel = cache[index]
        assert row["clip_id"] == clip_id and row["num_frames"] == log_mel.shape[1]
        np.testing.assert_array_equal(np.frombuffer(row["log_mel"], "<f2").reshape(80, -1), log_mel)


def test_cache_bytes_are_deterministic_whatever_the_number_of_processes(corpus, cache_dir, tmp_path):
    preprocess_to_cache(corpus, tmp_path / "again", shard_size=2, num_workers=2)
    files = sorted(path.name for path in cache_dir.iterdir())
    assert files == ["logmels-00000-of-00002.arrow", "logmels-00001-of-00002.arrow", "metadata.json"]
    assert sorted(path.name for path in (tmp_path / "again").iterdir()) == files
    for name in files:
        assert (cache_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_record_batches_end_at_their_row_or_byte_limit(corpus, cache_dir, tmp_path, monkeypatch):
    """
    Binary arrays have 32-bit offsets: a batch is written once it holds `_ROWS_PER_BATCH` clips or `_BYTES_PER_BATCH`
    bytes, whichever comes first, counted from the last batch. The clips are 698, 678 and 724 frames of 80 x 2 bytes.
    """

    def batch_rows(directory: Path) -> list[list[int]]:
        shards = sorted(directory.glob("logmels-*.arrow"))
        return [[batch.num_rows for batch in pa.ipc.open_stream(shard.read_bytes())] for shard in shards]

    monkeypatch.setattr(logmel_cache, "_ROWS_PER_BATCH", 2)
    preprocess_to_cache(corpus, tmp_path / "rows", shard_size=3)
    assert batch_rows(tmp_path / "rows") == [[2, 1]]
    monkeypatch.setattr(logmel_cache, "_ROWS_PER_BATCH", 64)
    monkeypatch.setattr(logmel_cache, "_BYTES_PER_BATCH", 200_000)  # 111,680 bytes, then 220,160 with the second
    preprocess_to_cache(corpus, tmp_path / "bytes", shard_size=3)
    assert batch_rows(tmp_path / "bytes") == [[2, 1]]
    for index in range(len(corpus)):
        np.testing.assert_array_equal(LogMelCache(tmp_path / "bytes")[index][1], LogMelCache(cache_dir)[index][1])


def test_a_stopped_build_resumes_after_its_last_finished_shard(tmp_path, monkeypatch):
    """Stopped in its second shard, the build keeps the first; the same call computes only the rest, the same bytes."""
    files = [_write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index) for index in range(7)]
    files[1] = _write(tmp_path / "audio" / "1_short.wav", CROP - 1)
    files[4] = tmp_path / "audio" / "4_corrupt.wav"
    files[4].write_bytes(b"not audio")
    preprocess_to_cache(files, tmp_path / "reference", shard_size=2)

    computed = []
    compute = logmel_cache._compute

    def stopping_compute(value, *args):
        if len(computed) == stop_after:
            raise KeyboardInterrupt
        computed.append(Path(value).name)
        return compute(value, *args)

    monkeypatch.setattr(logmel_cache, "_compute", stopping_compute)
    output, building = tmp_path / "logmels", tmp_path / ".logmels.building"
    stop_after = 5  # the first shard (clips 0 and 2) ended at the third clip; the second (3 and 5) is left unfinished
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(files, output, shard_size=2)
    assert not output.exists()
    with pytest.raises(FileNotFoundError, match="a stopped build of it is in .*: run the same build again"):
        LogMelCache(output)
    progress = json.loads((building / "progress.json").read_text())
    assert progress["read"] == 3 and progress["counts"] == {"kept": 2, "short": 1, "corrupt": 0, "frames": 608 + 628}
    assert [name for name, _ in progress["shards"]] == ["logmels-00000.arrow.incomplete"]

    computed.clear()
    stop_after = None
    metadata = preprocess_to_cache(files, output, shard_size=2)
    assert computed == ["3.wav", "4_corrupt.wav", "5.wav", "6.wav"]
    assert not building.exists() and metadata["num_clips"] == 5 and metadata["num_skipped_corrupt"] == 1
    files_written = sorted(path.name for path in output.iterdir())
    assert files_written == sorted(path.name for path in (tmp_path / "reference").iterdir())
    for name in files_written:
        assert (output / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name

    # A stopped build of another source is not resumed: its shards are dropped and the new source read from the start.
    stop_after = len(computed) + 3
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(files, tmp_path / "other", shard_size=2)
    computed.clear()
    stop_after = None
    preprocess_to_cache(files[::-1], tmp_path / "other", shard_size=2)
    assert computed == [path.name for path in files[::-1]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audio", "logmels", "other", "reference"]


def test_a_build_stopped_while_it_is_swapped_in_is_finished_by_the_same_call(tmp_path, monkeypatch):
    """Before: its progress file went first, so the same call threw the complete build away and started over."""
    files = [_write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index) for index in range(5)]
    preprocess_to_cache(files, tmp_path / "reference", shard_size=2)
    swap_in = logmel_cache._swap_in

    def stopped_swap_in(built, output_dir):
        raise KeyboardInterrupt  # a kill between the last shard and the swap

    monkeypatch.setattr(logmel_cache, "_swap_in", stopped_swap_in)
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(files, tmp_path / "logmels", shard_size=2)
    monkeypatch.setattr(logmel_cache, "_swap_in", swap_in)
    computed = []
    compute = logmel_cache._compute
    monkeypatch.setattr(logmel_cache, "_compute", lambda value, *args: computed.append(value) or compute(value, *args))
    preprocess_to_cache(files, tmp_path / "logmels", shard_size=2)
    assert computed == [str(files[4])]  # only the last shard, of one clip, which a build records when it ends
    written = sorted(path.name for path in (tmp_path / "logmels").iterdir())
    assert written == sorted(path.name for path in (tmp_path / "reference").iterdir())
    for name in written:
        assert (tmp_path / "logmels" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_a_stopped_build_from_a_stream_resumes_without_reading_its_finished_source_shards(
    tmp_path, monkeypatch, caplog
):
    """3 source shards of 3 clips, cache shards of 2: stopped in the third cache shard, resumed in source shard 1."""
    paths = [
        os.fspath(_write(tmp_path / "audio" / f"{index}.wav", CROP + 800 * index, seed=index)) for index in range(9)
    ]
    stream = datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio())
    stream = stream.to_iterable_dataset(num_shards=3)
    preprocess_to_cache(stream, tmp_path / "reference", shard_size=2)

    computed, opened = [], []
    compute, keyed_shard = logmel_cache._compute, data_module._StreamedClips._keyed_shard

    def stopping_compute(value, *args):
        if len(computed) == stop_after:
            raise KeyboardInterrupt
        computed.append(Path(value["path"]).name)
        return compute(value, *args)

    def recording_keyed_shard(self, shard):
        opened.append(shard)
        return keyed_shard(self, shard)

    monkeypatch.setattr(logmel_cache, "_compute", stopping_compute)
    monkeypatch.setattr(data_module._StreamedClips, "_keyed_shard", recording_keyed_shard)
    stop_after = 5  # cache shards (0, 1) and (2, 3) are done: the last clip read is row 0 of source shard 1
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(stream, tmp_path / "logmels", shard_size=2)
    assert json.loads((tmp_path / ".logmels.building" / "progress.json").read_text())["last"] == [1, 0]

    computed.clear()
    opened.clear()
    stop_after = None
    preprocess_to_cache(stream, tmp_path / "logmels", shard_size=2)
    assert opened == [1, 2] and computed == [f"{index}.wav" for index in range(4, 9)]
    names = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert sorted(path.name for path in (tmp_path / "logmels").iterdir()) == names
    for name in names:
        assert (tmp_path / "logmels" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name

    # Another stream of 3 shards (the same clips in reverse order) looks alike by name, split and shard count, but the
    # clip at the recorded place differs: its build starts over and writes the other stream's cache.
    other = datasets.Dataset.from_dict({"audio": paths[::-1]}).cast_column("audio", datasets.Audio())
    other = other.to_iterable_dataset(num_shards=3)
    preprocess_to_cache(other, tmp_path / "other_reference", shard_size=2)
    stop_after = 5
    computed.clear()
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(stream, tmp_path / "other", shard_size=2)
    computed.clear()
    stop_after = None
    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
        preprocess_to_cache(other, tmp_path / "other", shard_size=2)
    assert "because it read another source (its last recorded clip differs" in caplog.text
    assert "(shards done: 2, clips kept: 4, clips of the source read: 4)" in caplog.text
    assert computed == [Path(path).name for path in paths[::-1]]
    names = sorted(path.name for path in (tmp_path / "other_reference").iterdir())
    assert sorted(path.name for path in (tmp_path / "other").iterdir()) == names
    for name in names:
        assert (tmp_path / "other" / name).read_bytes() == (tmp_path / "other_reference" / name).read_bytes(), name


def _stopping_compute(monkeypatch) -> tuple[list[str], list[int | None]]:
    """`_compute` records the names of the clips it computes and stops the build before the `stop[0]`-th one."""
    computed, stop = [], [None]
    compute = logmel_cache._compute

    def stopping_compute(value, *args):
        if len(computed) == stop[0]:
            raise KeyboardInterrupt
        computed.append(Path(value).name)
        return compute(value, *args)

    monkeypatch.setattr(logmel_cache, "_compute", stopping_compute)
    return computed, stop


def test_a_stopped_build_resumes_whatever_the_spelling_of_its_source_folder(tmp_path, monkeypatch, caplog):
    """Stopped with a relative folder, resumed from another directory, then with an absolute path: the same bytes."""
    for index in range(5):
        _write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index)
    preprocess_to_cache(list_audio_files(tmp_path / "audio"), tmp_path / "reference", shard_size=2)
    computed, stop = _stopping_compute(monkeypatch)

    monkeypatch.chdir(tmp_path)
    stop[0] = 3  # the first shard (clips 0 and 1) is finished
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(list_audio_files("audio"), "logmels", shard_size=2)
    monkeypatch.chdir(tmp_path / "audio")
    computed.clear()
    stop[0] = 2  # resumed after clip 1: the second shard (clips 2 and 3) is finished
    with caplog.at_level(logging.INFO, logger="modeling_matpac.pretraining.logmel_cache"):
        with pytest.raises(KeyboardInterrupt):
            preprocess_to_cache(list_audio_files("."), "../logmels", shard_size=2)
        assert computed == ["2.wav", "3.wav"]
        computed.clear()
        stop[0] = None
        metadata = preprocess_to_cache(list_audio_files(tmp_path / "audio"), tmp_path / "logmels", shard_size=2)
    assert computed == ["4.wav"] and metadata["num_clips"] == 5
    assert caplog.text.count("Resuming the stopped build") == 2 and "Dropping" not in caplog.text

    clip_ids = [LogMelCache(tmp_path / "logmels")[index][0] for index in range(5)]
    assert clip_ids == [str(tmp_path / "audio" / f"{index}.wav") for index in range(5)]
    names = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert sorted(path.name for path in (tmp_path / "logmels").iterdir()) == names
    for name in names:
        assert (tmp_path / "logmels" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_a_build_stopped_while_naming_its_shards_keeps_them(tmp_path, monkeypatch):
    """Before: stopped after its shards got their final names, before its metadata, it dropped every shard."""
    files = [_write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index) for index in range(5)]
    preprocess_to_cache(files, tmp_path / "reference", shard_size=2)
    finish = logmel_cache._ShardWriter.finish

    def finish_then_stop(self):
        finish(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(logmel_cache._ShardWriter, "finish", finish_then_stop)
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(files, tmp_path / "logmels", shard_size=2)
    monkeypatch.setattr(logmel_cache._ShardWriter, "finish", finish)
    computed, _ = _stopping_compute(monkeypatch)
    preprocess_to_cache(files, tmp_path / "logmels", shard_size=2)
    assert computed == ["4.wav"]  # the two full shards kept; the last, unrecorded one computed again
    for path in (tmp_path / "reference").iterdir():
        assert (tmp_path / "logmels" / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_stopped_build_of_another_source_or_settings_is_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
    files = [_write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index) for index in range(5)]
    computed, stop = _stopping_compute(monkeypatch)

    another_source = "it read another source, or files of the source changed since"
    for changed, reason in [
        ({"source": files[:4]}, another_source),
        # Before: resumed, keeping the log-mels of the files' former content.
        ({"rewrite": files[0]}, another_source),
        ({"shard_size": 3}, "it had other settings (shard_size 2 then, 3 now)"),
        ({"min_frames": 600}, "it had other settings (min_frames 608 then, 600 now)"),
    ]:
        output, building = tmp_path / "logmels", tmp_path / ".logmels.building"
        shutil.rmtree(output, ignore_errors=True)
        computed.clear()
        stop[0] = 3  # the first shard (clips 0 and 1) is finished
        with pytest.raises(KeyboardInterrupt):
            preprocess_to_cache(files, output, shard_size=2)
        if "rewrite" in changed:  # the same name, other audio (a re-exported folder)
            _write(changed.pop("rewrite"), CROP + 800, seed=99)
        computed.clear()
        stop[0] = None
        caplog.clear()
        arguments = {"source": files, "shard_size": 2, **changed}
        with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
            metadata = preprocess_to_cache(output_dir=output, **arguments)
        assert caplog.messages == [
            f"Dropping the stopped build in {building} because {reason}: its finished shards are deleted (shards "
            "done: 1, clips kept: 2, clips of the source read: 2). Starting over."
        ]
        assert computed == [path.name for path in arguments["source"]]
        assert metadata["num_clips"] == len(arguments["source"]) and not building.exists()


@pytest.mark.parametrize(
    "change, reason",
    [
        ("rewrite_same_size", "it read another source, or files of the source changed since"),
        ("delete_shard", "its shard files ['logmels-00000.arrow.incomplete'] are missing"),
    ],
)
def test_a_stopped_build_is_started_over_when_a_file_changed_at_its_size_or_its_shard_is_gone(
    tmp_path, monkeypatch, caplog, change, reason
):
    """
    A file exported again at the same length keeps its size: its modification time tells it changed. A finished shard
    deleted from the building folder cannot be kept. Both builds are started over, with a warning, and hold the files'
    current audio.
    """
    files = [_write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index) for index in range(5)]
    computed, stop = _stopping_compute(monkeypatch)
    output, building = tmp_path / "logmels", tmp_path / ".logmels.building"
    stop[0] = 3  # the first shard (clips 0 and 1) is finished
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(files, output, shard_size=2)
    if change == "rewrite_same_size":
        before = files[0].stat()
        _write(files[0], CROP, seed=99)
        # A later modification time whatever the clock's resolution.
        os.utime(files[0], ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        assert files[0].stat().st_size == before.st_size
    else:
        (building / "logmels-00000.arrow.incomplete").unlink()
    computed.clear()
    stop[0] = None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
        metadata = preprocess_to_cache(files, output, shard_size=2)
    assert caplog.messages == [
        f"Dropping the stopped build in {building} because {reason}: its finished shards are deleted (shards done: 1, "
        "clips kept: 2, clips of the source read: 2). Starting over."
    ]
    assert computed == [path.name for path in files]
    assert metadata["num_clips"] == 5 and not building.exists()
    preprocess_to_cache(files, tmp_path / "reference", shard_size=2)
    names = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert sorted(path.name for path in output.iterdir()) == names
    for name in names:
        assert (output / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_a_stopped_build_of_a_stream_is_started_over_for_other_bytes_under_the_same_names(
    tmp_path, monkeypatch, caplog
):
    """
    Rows that hold their audio are told apart by their bytes, not their paths: two exports may name their clips alike
    (here 0.wav to 3.wav in 2 shards), and resuming one's build with the other mixed their log-mels.
    """

    def stream(seed: int) -> datasets.IterableDataset:
        rows = []
        for row in range(4):
            path = _write(tmp_path / "audio" / f"{seed}_{row}.wav", CROP + 100 * row, seed=seed + row)
            rows.append({"bytes": path.read_bytes(), "path": f"{row}.wav"})
        dataset = datasets.Dataset.from_dict({"audio": rows}).cast_column("audio", datasets.Audio(decode=False))
        return dataset.to_iterable_dataset(num_shards=2)

    first, other = stream(0), stream(10)
    preprocess_to_cache(other, tmp_path / "reference", shard_size=2)
    computed, compute = [], logmel_cache._compute

    def stopping_compute(value, *args):
        if len(computed) == 3:
            raise KeyboardInterrupt
        computed.append(value["path"])
        return compute(value, *args)

    monkeypatch.setattr(logmel_cache, "_compute", stopping_compute)
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(first, tmp_path / "logmels", shard_size=2)
    assert json.loads((tmp_path / ".logmels.building" / "progress.json").read_text())["last"] == [0, 1]

    monkeypatch.setattr(logmel_cache, "_compute", compute)
    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
        preprocess_to_cache(other, tmp_path / "logmels", shard_size=2)
    assert "because it read another source (its last recorded clip differs from this source's clip there)" in (
        caplog.text
    )
    names = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert sorted(path.name for path in (tmp_path / "logmels").iterdir()) == names
    for name in names:
        assert (tmp_path / "logmels" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_a_build_clears_its_building_folder_of_anything_it_did_not_record(corpus, tmp_path):
    """What no progress file records, files or folders (a copy tool's, a crashed build's), stays out of the cache."""
    building = tmp_path / ".logmels.building"
    (building / "stray" / "deep").mkdir(parents=True)
    (building / "logmels-00000.arrow.incomplete").write_bytes(b"half a shard")
    preprocess_to_cache(corpus[:1], tmp_path / "logmels")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["logmels"]
    assert sorted(path.name for path in (tmp_path / "logmels").iterdir()) == [
        "logmels-00000-of-00001.arrow",
        "metadata.json",
    ]


def test_a_build_stopped_before_its_first_shard_leaves_nothing_behind(tmp_path, monkeypatch):
    """With no finished shard there is nothing to resume: Ctrl-C removes the building folder, as an error does."""
    files = [_write(tmp_path / "audio" / f"{index}.wav", CROP + 1600 * index, seed=index) for index in range(3)]
    computed, stop = _stopping_compute(monkeypatch)
    stop[0] = 1  # in the first shard, after one clip was written to it
    with pytest.raises(KeyboardInterrupt):
        preprocess_to_cache(files, tmp_path / "logmels", shard_size=2)
    assert computed == ["0.wav"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audio"]


# ---------------------------------------------------------------------------------------------------------------------
# Skipping


def test_short_and_corrupt_clips_are_skipped_and_counted(tmp_path, caplog, extractor):
    files = [
        _write(tmp_path / "a_short.wav", CROP - 1),
        _write(tmp_path / "b_exact.wav", CROP, seed=1),
        _write(tmp_path / "c_short_44k.wav", 268_700, 44100),  # 97,488 samples once at 16 kHz
        tmp_path / "d_random_bytes.wav",
        tmp_path / "e_empty.wav",
        _write(tmp_path / "f_long.wav", 120_000, seed=2),
    ]
    files[3].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    files[4].write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
        metadata = preprocess_to_cache(files, tmp_path / "cache", description="six test clips")
    assert (metadata["num_clips"], metadata["num_skipped_short"], metadata["num_skipped_corrupt"]) == (2, 2, 2)
    assert metadata["num_frames"] == 608 + 1 + (120_000 - 400) // 160
    assert json.loads((tmp_path / "cache" / "metadata.json").read_text()) == metadata
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("d_random_bytes" in message and "cannot open" in message for message in warnings)
    assert any("e_empty" in message and "empty" in message for message in warnings)

    examples = list(MatpacLogMelCacheDataset(tmp_path / "cache", shuffle=False, infinite=False))
    assert [Path(example["clip_id"]).name for example in examples] == ["b_exact.wav", "f_long.wav"]
    assert all(example["num_skipped_short"] == example["num_skipped_corrupt"] == 0 for example in examples)
    exact = _log_mel(extractor, decode_mono_16k(files[1]))  # a clip of exactly one crop is the crop
    torch.testing.assert_close(examples[0]["input_values"], exact, atol=FLOAT16_TOLERANCE, rtol=0)

    # Crops longer than the cache was built for: the clips too short for them are skipped and counted when reading.
    longer = list(MatpacLogMelCacheDataset(tmp_path / "cache", num_frames=700, shuffle=False, infinite=False))
    assert [Path(example["clip_id"]).name for example in longer] == ["f_long.wav"]
    assert longer[0]["num_skipped_short"] == 1 and longer[0]["input_values"].shape == (80, 700)

    with pytest.raises(ValueError, match="No clip of the source is usable: 1 shorter than 608 frames"):
        preprocess_to_cache(files[:1], tmp_path / "nothing")


def test_a_null_audio_cell_is_skipped_and_counted_as_undecodable(tmp_path, caplog):
    def wav(num_samples: int, seed: int) -> bytes:
        path = _write(tmp_path / f"{seed}.wav", num_samples, seed=seed)
        return path.read_bytes()

    rows = [{"bytes": wav(CROP + 100 * row, row), "path": f"{row}.wav"} for row in range(4)]
    rows[2] = None
    source = datasets.Dataset.from_dict({"audio": rows}).cast_column("audio", datasets.Audio(decode=False))
    stream = source.to_iterable_dataset(num_shards=2)  # rows (0, 1) and (2, 3)
    for name, clips, num_workers, null_id, kept_ids in [
        ("rows", source, 2, "2", ["0", "1", "3"]),
        ("stream", stream, None, "1/0", ["0/0", "0/1", "1/1"]),
    ]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
            metadata = preprocess_to_cache(clips, tmp_path / name, num_workers=num_workers)
        assert (metadata["num_clips"], metadata["num_skipped_short"], metadata["num_skipped_corrupt"]) == (3, 0, 1)
        assert caplog.messages == [f"Skipping undecodable audio clip {null_id}: the row's audio cell is null"]
        cache = LogMelCache(tmp_path / name)
        assert [cache[index][0] for index in range(3)] == kept_ids


def test_log_mels_beyond_float16_are_skipped_and_counted_as_undecodable(corpus, tmp_path, caplog):
    """
    Statistics that push normalised values past float16's 65,504 (here std=1e-5) would store infinite log-mels, hence
    NaN weights: such clips are skipped and counted, and a source of nothing else is refused.
    """
    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.logmel_cache"):
        with pytest.raises(
            ValueError,
            match=r"^No clip of the source is usable: 0 shorter than 608 frames \(97520 samples at 16 kHz\), 3 undec",
        ):
            preprocess_to_cache(corpus, tmp_path / "cache", MatpacFeatureExtractor(std=1e-5))
    assert caplog.messages == [
        f"Skipping undecodable audio clip {path}: its log-mel has NaN or infinite values" for path in corpus
    ]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Bad caches and directories


def test_a_cache_is_refused_with_another_front_end_or_when_incomplete(corpus, cache_dir, tmp_path):
    with pytest.raises(ValueError, match=r"another front end .*hop_length=160 \(cache\) vs 320"):
        MatpacLogMelCacheDataset(cache_dir, feature_extractor=MatpacFeatureExtractor(hop_length=320))
    with pytest.raises(ValueError, match=r"mean=-7.056 \(cache\) vs -6.0"):
        MatpacLogMelCacheDataset(cache_dir, feature_extractor=MatpacFeatureExtractor(mean=-6.0))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        LogMelCache(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "logmels-00000.arrow.incomplete").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no metadata.json, so its build was interrupted"):
        LogMelCache(partial)

    with pytest.raises(FileExistsError, match="already holds a log-mel cache .*overwrite=True"):
        preprocess_to_cache(corpus, partial)
    preprocess_to_cache(corpus[:1], partial, overwrite=True)
    assert sorted(path.name for path in partial.iterdir()) == ["logmels-00000-of-00001.arrow", "metadata.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not part of a log-mel cache \\(notes.txt\\)"):
        preprocess_to_cache(corpus, tmp_path / "other", overwrite=True)
    with pytest.raises(ValueError, match="log-mel cache .*--train_cache"):
        list_audio_files(cache_dir)


def test_a_cache_rebuilt_while_it_is_read_stops_the_reader(corpus, tmp_path):
    """Before: the shards a reader had not opened yet came from the new build, other statistics and all, silently."""
    preprocess_to_cache(corpus, tmp_path / "logmels", shard_size=2)
    cache = LogMelCache(tmp_path / "logmels")
    first = cache[0][1].copy()
    preprocess_to_cache(corpus, tmp_path / "logmels", MatpacFeatureExtractor(mean=-4.0), shard_size=2, overwrite=True)
    np.testing.assert_array_equal(cache[0][1], first)  # the shard it had open: still its own build
    with pytest.raises(ValueError, match="logmels' was rebuilt or removed while this run read it. Resume the run"):
        cache[2]


def test_a_cache_goes_where_a_link_points_and_never_replaces_the_current_directory(corpus, tmp_path, monkeypatch):
    """
    Before: a cache asked at a link was built beside the link (another disk), then its swap failed on the link and
    left the link's target empty; `.` failed with "PosixPath('.') has an empty name".
    """
    (tmp_path / "bigdisk" / "logmels").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "logmels").symlink_to(tmp_path / "bigdisk" / "logmels")
    preprocess_to_cache(corpus[:1], tmp_path / "work" / "logmels")
    assert (tmp_path / "work" / "logmels").is_symlink()
    assert sorted(path.name for path in (tmp_path / "bigdisk" / "logmels").iterdir()) == [
        "logmels-00000-of-00001.arrow",
        "metadata.json",
    ]
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["logmels"]
    monkeypatch.chdir(tmp_path / "work")
    for spelled in [".", ".."]:
        with pytest.raises(ValueError, match="is the current directory or holds it: .*for instance ./logmels"):
            preprocess_to_cache(corpus[:1], spelled)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bigdisk", "work"]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"num_clips": 4}, "says num_clips=4, but its 2 shards hold 3 clips: it was modified"),
        ({"num_clips": 2}, "says num_clips=2, but its 2 shards hold 3 clips: it was modified"),
        ({"shards": None}, "lacks shards: rebuild the cache"),
        ({"num_clips": None, "front_end": None}, "lacks front_end, num_clips: rebuild the cache"),
        ({"shards": [{"file": "logmels-00000-of-00002.arrow"}]}, "does not list its shards as {file, num_clips}"),
    ],
)
def test_a_cache_whose_metadata_disagrees_with_its_shards_is_refused_when_opened(cache_dir, tmp_path, edit, message):
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    metadata = json.loads((broken / "metadata.json").read_text())
    for key, value in edit.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    (broken / "metadata.json").write_text(json.dumps(metadata))
    for open_cache in (LogMelCache, MatpacLogMelCacheDataset):
        with pytest.raises(ValueError, match="^" + re.escape(f"{broken / 'metadata.json'} {message}")):
            open_cache(broken)


def test_overwriting_a_cache_leaves_the_new_cache_alone_in_its_folder(corpus, tmp_path):
    """
    Replaced with `overwrite=True`, the previous cache goes: no `.logmels.previous` stays beside the new one (a second
    copy of a corpus's log-mels), and the progress file that a build stopped between its swap and its clean-up left in
    the cache is part of the cache, not a stranger's file that blocks the replacement.
    """
    output = tmp_path / "logmels"
    preprocess_to_cache(corpus, output, shard_size=2)
    (output / "progress.json").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds a log-mel cache .*overwrite=True"):
        preprocess_to_cache(corpus[:1], output)
    metadata = preprocess_to_cache(corpus[:1], output, overwrite=True)
    assert metadata["num_clips"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["logmels"]
    assert sorted(path.name for path in output.iterdir()) == ["logmels-00000-of-00001.arrow", "metadata.json"]
    assert LogMelCache(output)[0][0] == str(corpus[0])


@pytest.mark.parametrize("argument", ["min_frames", "shard_size"])
def test_a_build_with_zero_frames_or_clips_per_shard_is_refused(corpus, tmp_path, argument):
    """A shard size of 0 wrote every clip into one shard, and `min_frames=0` kept clips too short for one frame."""
    with pytest.raises(ValueError, match=f"^`{argument}` must be a positive integer, got 0.$"):
        preprocess_to_cache(corpus, tmp_path / "cache", **{argument: 0})
    assert list(tmp_path.iterdir()) == []


def test_a_shard_that_grew_is_refused_like_a_truncated_one(cache_dir, tmp_path):
    """Bytes appended to a shard (a copy gone wrong) change its size too: the reader would ignore them silently."""
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    shard = broken / "logmels-00001-of-00002.arrow"
    size = shard.stat().st_size
    with shard.open("ab") as file:
        file.write(bytes(8))
    with pytest.raises(ValueError, match=re.escape(f"{shard} has {size + 8:,} bytes, not the {size:,} its metadata")):
        LogMelCache(broken)


def test_a_shard_whose_rows_disagree_with_the_metadata_is_refused_when_first_read(cache_dir, tmp_path):
    """
    Without byte counts in the metadata (the size check is skipped), a shard's rows are still counted against it when
    the shard is first read: clip counts moved between shards keep the total and would read clip 2 as clip 1.
    """
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    metadata = json.loads((broken / "metadata.json").read_text())
    assert [shard["num_clips"] for shard in metadata["shards"]] == [2, 1]
    metadata["shards"] = [
        {"file": shard["file"], "num_clips": num_clips} for shard, num_clips in zip(metadata["shards"], [1, 2])
    ]
    (broken / "metadata.json").write_text(json.dumps(metadata))
    cache = LogMelCache(broken)
    with pytest.raises(
        ValueError, match=re.escape(f"{broken / 'logmels-00000-of-00002.arrow'} does not match the metadata of its ")
    ) as error:
        cache[0]
    assert "(2 rows, 1 expected;" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Distribution over processes and DataLoader workers


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 0)])
def test_each_cached_clip_is_read_once_per_epoch_by_exactly_one_process_and_worker(tmp_path, world_size, num_workers):
    files = [_write(tmp_path / f"clip_{index}.wav", 100_000 + 5000 * index, seed=index) for index in range(7)]
    files.append(_write(tmp_path / "short.wav", 50_000))
    preprocess_to_cache(files, tmp_path / "cache", shard_size=3)

    def read(rank: int, world_size: int, num_workers: int) -> dict[str, torch.Tensor]:
        dataset = MatpacLogMelCacheDataset(tmp_path / "cache", rank=rank, world_size=world_size, infinite=False)
        dataset.set_epoch(1)
        examples = list(DataLoader(dataset, batch_size=None, num_workers=num_workers))
        crops = {example["clip_id"]: example["input_values"] for example in examples}
        assert len(crops) == len(examples), "a clip was read twice"
        return crops

    reference = read(0, 1, 0)
    assert sorted(reference) == sorted(str(path) for path in files[:7])
    per_rank = [read(rank, world_size, num_workers) for rank in range(world_size)]
    assert Counter(clip_id for crops in per_rank for clip_id in crops) == Counter(reference.keys())
    assert all(len(crops) >= 2 for crops in per_rank)
    for crops in per_rank:
        for clip_id, crop in crops.items():
            assert torch.equal(crop, reference[clip_id])


# ---------------------------------------------------------------------------------------------------------------------
# run_pretraining.py


def _run(output_dir: Path, *flags: str) -> None:
    run_pretraining.main(
        ["--output_dir", str(output_dir), "--config_overrides", TINY, "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm", "True", *flags]
    )  # fmt: skip


def test_run_pretraining_preprocesses_then_trains_from_the_cache(tmp_path):
    cache = tmp_path / "logmels"
    _run(tmp_path / "prepare", "--preprocess_to", str(cache), "--builtin_corpus_clips", "3")
    metadata = json.loads((cache / "metadata.json").read_text())
    assert metadata["num_clips"] == 3 and metadata["description"] == "the built-in synthetic corpus"
    assert not (tmp_path / "prepare" / "trainer_state.json").exists()  # it only pre-processed

    _run(tmp_path / "train", "--train_cache", str(cache), "--max_steps", "2")
    history = json.loads((tmp_path / "train" / "trainer_state.json").read_text())["log_history"]
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2]
    assert all(np.isfinite(entry["loss"]) and entry["num_skipped_short"] == 0 for entry in losses)
    assert f"log-mels cached in {cache}" in (tmp_path / "train" / "README.md").read_text()

    with pytest.raises(ValueError, match=r"another front end .*mean=-7.056 \(cache\) vs -6.0"):
        _run(tmp_path / "other", "--train_cache", str(cache), "--config_overrides", f"{TINY},lms_mean=-6.0")
    with pytest.raises(ValueError, match="one after the other"):
        _run(tmp_path / "both", "--train_cache", str(cache), "--preprocess_to", str(tmp_path / "again"))
