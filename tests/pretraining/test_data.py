"""Tests of the pre-training data pipeline: decoding, cropping, skipping, determinism, sharding and sources."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import io
import json
import logging
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from modeling_matpac.audio import (
    AudioDecodeError,
    audio_duration,
    check_all_samples,
    decode_audio,
    decode_mono_16k,
    decode_mono_16k_crop,
    decode_mono_16k_windows,
    to_mono_16k,
)
from modeling_matpac.feature_extraction_matpac import MatpacFeatureExtractor, log_mel_spectrogram
from modeling_matpac.pretraining import (
    MatpacPretrainingDataset,
    collate_pretraining_batch,
    generate_builtin_corpus,
    list_audio_files,
    load_audio_source,
)
from modeling_matpac.pretraining import data as data_module
from modeling_matpac.pretraining.data import SKIP_COUNTERS, SkippedClips
from modeling_matpac.pretraining.logmel_cache import preprocess_to_cache


CROP = 97_520  # 400 + 607 * 160 samples: exactly 608 frames


def _signal(num_samples: int, num_channels: int = 1, seed: int = 0) -> np.ndarray:
    """Noise plus a tone, `(samples, channels)` float32 in [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * rng.uniform(200, 2000) * np.arange(num_samples) / 16000)
    audio = 0.3 * tone[:, None] + 0.1 * rng.standard_normal((num_samples, num_channels))
    return np.clip(audio, -0.6, 0.6).astype(np.float32)


def _write(path: Path, num_samples: int, sampling_rate: int = 16000, num_channels: int = 1, seed: int = 0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _signal(num_samples, num_channels, seed), sampling_rate, **kw)
    return path


def _wav_bytes(num_samples: int, sampling_rate: int = 16000, seed: int = 0, audio_format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, _signal(num_samples, seed=seed), sampling_rate, format=audio_format)
    return buffer.getvalue()


def _ids_and_crops(examples) -> dict[str, torch.Tensor]:
    pairs = [(example["clip_id"], example["input_values"]) for example in examples]
    assert len({clip_id for clip_id, _ in pairs}) == len(pairs), "a clip was yielded twice"
    return dict(pairs)


def _keep_examples(examples: list[dict]) -> list[dict]:
    return examples


@pytest.fixture(scope="module")
def extractor() -> MatpacFeatureExtractor:
    return MatpacFeatureExtractor()


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize(
    "audio_format, subtype, exact",
    [("WAV", "PCM_16", True), ("FLAC", "PCM_16", True), ("OGG", "VORBIS", False), ("MP3", "MPEG_LAYER_III", False)],
)
def test_decode_audio_formats(tmp_path, audio_format, subtype, exact):
    samples = _signal(22050, num_channels=2)
    path = tmp_path / f"clip.{audio_format.lower()}"
    sf.write(path, samples, 22050, format=audio_format, subtype=subtype)

    for data in (path, str(path), path.read_bytes()):
        waveform, sampling_rate = decode_audio(data)
        assert sampling_rate == 22050
        assert waveform.dtype == np.float32 and waveform.shape[0] == 2 and waveform.flags.c_contiguous
        if exact:
            assert waveform.shape == (2, 22050)
            np.testing.assert_allclose(waveform, samples.T, atol=1 / 32768)
        else:  # lossy codecs: same length give or take the codec's padding, same waveform roughly
            assert abs(waveform.shape[1] - 22050) <= 2304
            assert np.abs(waveform).max() > 0.3


def test_decode_audio_rejects_corrupt_empty_and_non_finite(tmp_path):
    random_bytes = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (tmp_path / "empty.wav").write_bytes(b"")
    no_samples = tmp_path / "no_samples.wav"
    sf.write(no_samples, np.zeros((0, 1), np.float32), 16000)
    nan_wav = tmp_path / "nan.wav"
    sf.write(nan_wav, np.array([0.1, np.nan, 0.2] * 200, np.float32), 16000, subtype="FLOAT")

    for data, reason in [
        (random_bytes, "cannot open"),
        (b"", "empty"),
        (tmp_path / "empty.wav", "empty"),
        (tmp_path / "missing.wav", "cannot open"),
        (no_samples, "no samples"),
        (nan_wav, "NaN"),
    ]:
        with pytest.raises(AudioDecodeError, match=reason):
            decode_audio(data)
    with pytest.raises(TypeError, match="bytes or a file path"):
        decode_audio(np.zeros(10))


def test_to_mono_16k_averages_channels_and_resamples():
    stereo = torch.from_numpy(_signal(16000, num_channels=2).T.copy())
    assert torch.equal(to_mono_16k(stereo, 16000), stereo.mean(dim=0))
    assert torch.equal(to_mono_16k(stereo[0].numpy(), 16000), stereo[0])

    resampled = to_mono_16k(_signal(66150, num_channels=2).T, 44100)  # 1.5 s at 44.1 kHz
    assert resampled.shape == (24000,) and resampled.dtype == torch.float32
    assert to_mono_16k(np.zeros((1, 44101), np.float32), 44100).shape == (16001,)  # ceil(44101 * 16000 / 44100)
    with pytest.raises(ValueError, match="shape"):
        to_mono_16k(np.zeros((1, 2, 3)), 16000)


def test_decode_mono_16k_counts_min_samples_at_16k_and_keeps_a_clip_of_exactly_that_many(tmp_path):
    """`min_samples` is a length at 16 kHz (0.5 s at 8 kHz: 4,000 samples, 8,000 at 16 kHz); a clip may equal it."""
    at_8k, at_16k = _write(tmp_path / "8k.wav", 4000, 8000), _write(tmp_path / "16k.wav", CROP)
    waveform = decode_mono_16k(at_8k, min_samples=8000)
    assert waveform is not None and waveform.shape == (8000,)
    assert decode_mono_16k(at_8k, min_samples=8001) is None
    assert torch.equal(decode_mono_16k(at_16k, min_samples=CROP), torch.from_numpy(decode_audio(at_16k)[0][0]))
    assert decode_mono_16k(at_16k, min_samples=CROP + 1) is None


@pytest.mark.parametrize("whole_below", [0, 10**9], ids=["window-by-window", "whole"])
def test_windows_stop_where_the_last_one_would_hold_only_overlap(tmp_path, whole_below):
    """Windows start at k * step while k * step + overlap is below the length: none holds only the last overlap."""
    path = _write(tmp_path / "clip.wav", 32_100)  # windows at 0 and 16,000; one at 32,000 would hold 100 samples
    windows = list(decode_mono_16k_windows(path, step=16_000, overlap=240, whole_below=whole_below))
    assert [len(window) for window in windows] == [16_240, 16_100]
    whole = decode_mono_16k(path)
    assert torch.equal(windows[0], whole[:16_240]) and torch.equal(windows[1], whole[16_000:])


def test_audio_duration_is_the_header_length_in_seconds(tmp_path):
    """Seconds from the header at the file's own rate, fractions kept; 0 for a file that cannot be opened."""
    assert audio_duration(_write(tmp_path / "a.wav", 24_000)) == 1.5
    assert audio_duration(_write(tmp_path / "b.flac", 33_075, 22050, num_channels=2)) == 1.5
    assert audio_duration(_wav_bytes(4000)) == 0.25
    assert audio_duration(tmp_path / "missing.wav") == 0.0


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_check_all_samples_reads_32_and_64_bit_float_files_whole(tmp_path, subtype):
    """Both float subtypes can hold NaN or huge samples anywhere, beyond the first block of 2**18 frames too."""
    samples = _signal(3 * CROP)[:, 0].astype(np.float64)
    sf.write(tmp_path / "valid.wav", samples, 16000, subtype=subtype)
    assert check_all_samples(tmp_path / "valid.wav") is True
    samples[-1] = np.nan
    sf.write(tmp_path / "nan_last.wav", samples, 16000, subtype=subtype)
    with pytest.raises(AudioDecodeError, match="^the audio has NaN or infinite samples$"):
        check_all_samples(tmp_path / "nan_last.wav")
    samples[-1] = -2e3
    sf.write(tmp_path / "loud_last.wav", samples, 16000, subtype=subtype)
    with pytest.raises(AudioDecodeError, match=r"^the audio has samples of magnitude 2e\+03, beyond 1000"):
        check_all_samples(tmp_path / "loud_last.wav")
    assert check_all_samples(_write(tmp_path / "pcm.wav", 3 * CROP, subtype="PCM_16")) is False  # only opened


def test_a_read_shorter_than_asked_is_an_undecodable_clip(tmp_path, monkeypatch):
    """A stretch that decodes fewer frames than its header counts makes the clip skipped, not a crash of the run."""
    path = _write(tmp_path / "clip.wav", 3 * CROP)
    read = sf.SoundFile.read

    def short_read(self, frames=-1, **kwargs):  # one frame short, past the 1-frame read that checks the file's end
        return read(self, frames - 1 if frames > 1 else frames, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", short_read)
    with pytest.raises(AudioDecodeError, match=f"^the audio has fewer samples than its header's {3 * CROP}$"):
        decode_mono_16k_crop(path, CROP, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------------
# Crops


def _first_frame_start(crop: torch.Tensor, waveform: torch.Tensor, extractor) -> int:
    """The sample where `crop` starts in `waveform`, found by matching its first log-mel frame at every offset."""
    frames = waveform[: waveform.shape[0] - CROP + 400].unfold(0, 400, 1)
    first = log_mel_spectrogram(frames, extractor.mel_filters, extractor.window, 160, extractor.log_offset)[..., 0]
    distances = ((first - extractor.mean) / extractor.std - crop[:, 0]).abs().sum(dim=1)
    return int(distances.argmin())


def test_crops_are_the_feature_extractor_on_a_random_window(tmp_path, extractor):
    files = [
        _write(tmp_path / "a.wav", 112_000, seed=1),  # 7 s at 16 kHz
        _write(tmp_path / "b.flac", 300_000, 44100, num_channels=2, seed=2),  # 6.8 s of stereo at 44.1 kHz
    ]
    examples = list(MatpacPretrainingDataset(files, shuffle=False, infinite=False))
    assert [example["clip_id"] for example in examples] == [str(path) for path in files]

    starts = []
    for example, path in zip(examples, files, strict=True):
        crop = example["input_values"]
        assert crop.shape == (80, 608) and crop.dtype == torch.float32
        waveform = to_mono_16k(*decode_audio(path))
        start = _first_frame_start(crop, waveform, extractor)
        expected = extractor(waveform[start : start + CROP].numpy(), sampling_rate=16000, return_tensors="pt")
        torch.testing.assert_close(crop, expected["input_values"][0], atol=1e-6, rtol=0)
        starts.append(start)
    assert starts[0] > 0 or starts[1] > 0  # random windows, not the clips' beginnings


def test_crops_depend_only_on_seed_epoch_and_clip(tmp_path):
    files = [_write(tmp_path / f"{index}.wav", 110_000 + 1000 * index, seed=index) for index in range(4)]

    def epoch_crops(seed: int, epoch: int) -> dict[str, torch.Tensor]:
        dataset = MatpacPretrainingDataset(files, seed=seed, infinite=False)
        dataset.set_epoch(epoch)
        return _ids_and_crops(dataset)

    epoch_2 = epoch_crops(seed=0, epoch=2)
    assert epoch_2.keys() == {str(path) for path in files}
    again, epoch_3, other_seed = epoch_crops(0, 2), epoch_crops(0, 3), epoch_crops(1, 2)
    for clip_id, crop in epoch_2.items():
        assert torch.equal(crop, again[clip_id])
        assert not torch.allclose(crop, epoch_3[clip_id])
        assert not torch.allclose(crop, other_seed[clip_id])

    # The infinite stream started at epoch 2 goes on with epoch 3, in each epoch's own shuffled order.
    infinite = MatpacPretrainingDataset(files, seed=0)
    infinite.set_epoch(2)
    stream = iter(infinite)
    for expected in (epoch_2, epoch_3):
        got = [next(stream) for _ in range(4)]
        assert {example["clip_id"] for example in got} == expected.keys()
        for example in got:
            assert torch.equal(example["input_values"], expected[example["clip_id"]])
    orders = []
    for epoch in range(4):
        dataset = MatpacPretrainingDataset(files, infinite=False)
        dataset.set_epoch(epoch)
        orders.append(tuple(example["clip_id"] for example in dataset))
    assert len(set(orders)) > 1


def test_short_clips_are_skipped_and_counted(tmp_path):
    files = [
        _write(tmp_path / "a_short.wav", CROP - 1),
        _write(tmp_path / "b_exact.wav", CROP, seed=1),
        _write(tmp_path / "c_short_44k.wav", 268_700, 44100),  # 97,488 samples once at 16 kHz
        _write(tmp_path / "d_long.wav", 120_000, seed=2),
    ]
    examples = list(MatpacPretrainingDataset(files, shuffle=False, infinite=False))

    assert [Path(example["clip_id"]).name for example in examples] == ["b_exact.wav", "d_long.wav"]
    assert [example["num_skipped_short"] for example in examples] == [1, 1]
    assert [example["num_skipped_corrupt"] for example in examples] == [0, 0]
    waveform, _ = decode_audio(files[1])  # a clip of exactly one crop is the crop
    exact = MatpacFeatureExtractor()(waveform[0], sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(examples[0]["input_values"], exact["input_values"][0], atol=1e-6, rtol=0)


def test_corrupt_and_empty_files_are_skipped_with_a_warning(tmp_path, caplog):
    files = [
        _write(tmp_path / "a_valid.wav", 100_000, seed=1),
        tmp_path / "b_random_bytes.wav",
        tmp_path / "c_empty.wav",
        tmp_path / "d_nan.wav",
        _write(tmp_path / "e_valid.flac", 100_000, seed=2),
    ]
    files[1].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    files[2].write_bytes(b"")
    sf.write(files[3], np.full(100_000, np.nan, np.float32), 16000, subtype="FLOAT")

    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.data"):
        stream = iter(MatpacPretrainingDataset(files, shuffle=False))
        examples = [next(stream) for _ in range(4)]  # two epochs: the run goes on past the bad files

    assert [Path(example["clip_id"]).name for example in examples] == ["a_valid.wav", "e_valid.flac"] * 2
    assert [example["num_skipped_corrupt"] for example in examples] == [0, 3, 0, 3]
    assert [example["num_skipped_short"] for example in examples] == [0, 0, 0, 0]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per clip, not once per epoch
    for name, reason in [("b_random_bytes", "cannot open"), ("c_empty", "empty"), ("d_nan", "NaN")]:
        assert any(name in message and reason in message for message in warnings), (name, warnings)


def test_clips_with_bad_samples_outside_the_crop_are_skipped_in_every_epoch(tmp_path, caplog, monkeypatch):
    """Float files with a NaN, an infinite or an absurd sample that few crops of the clip cover."""
    files = [tmp_path / "a_nan_first.wav", tmp_path / "b_inf_last.wav", tmp_path / "c_loud_first.wav"]
    for path, (where, value) in zip(files, [(0, np.nan), (-1, np.inf), (0, 1e6)], strict=True):
        samples = _signal(3 * CROP)[:, 0]
        samples[where] = value
        sf.write(path, samples, 16000, subtype="FLOAT")
    files.append(_write(tmp_path / "d_valid.wav", 3 * CROP, seed=1, subtype="FLOAT"))
    files.append(_write(tmp_path / "e_pcm.wav", 3 * CROP, seed=2, subtype="PCM_16"))
    checked = Counter()
    original_check = data_module.check_all_samples

    def counting_check(audio):
        checked[Path(audio).name] += 1
        return original_check(audio)

    monkeypatch.setattr(data_module, "check_all_samples", counting_check)
    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.data"):
        stream = iter(MatpacPretrainingDataset(files, shuffle=False))
        examples = [next(stream) for _ in range(16)]  # two per epoch
    assert [Path(example["clip_id"]).name for example in examples] == ["d_valid.wav", "e_pcm.wav"] * 8
    # The valid float file is read whole once (before: at each of its 8 crops); the damaged ones at each epoch, the
    # PCM one never (each of its checks only opens it).
    assert checked == {
        "a_nan_first.wav": 8,
        "b_inf_last.wav": 8,
        "c_loud_first.wav": 8,
        "d_valid.wav": 1,
        "e_pcm.wav": 8,
    }
    assert [example["num_skipped_corrupt"] for example in examples] == [3, 0] * 8
    assert sorted(caplog.messages) == [
        f"Skipping undecodable audio clip {files[0]}: the audio has NaN or infinite samples",
        f"Skipping undecodable audio clip {files[1]}: the audio has NaN or infinite samples",
        f"Skipping undecodable audio clip {files[2]}: the audio has samples of magnitude 1e+06, beyond 1000 (float "
        "audio is in [-1, 1])",
    ]
    metadata = preprocess_to_cache(files, tmp_path / "cache")  # the cache skips the same clips
    assert (metadata["num_clips"], metadata["num_skipped_corrupt"]) == (2, 3)


def test_a_null_audio_cell_is_skipped_and_counted_as_undecodable(tmp_path, caplog):
    import datasets

    rows = [{"bytes": _wav_bytes(CROP + 100 * row, seed=row), "path": f"{row}.wav"} for row in range(4)]
    rows[2] = None
    source = datasets.Dataset.from_dict({"audio": rows}).cast_column("audio", datasets.Audio(decode=False))
    stream = source.to_iterable_dataset(num_shards=2)  # rows (0, 1) and (2, 3)
    for clips, null_id, kept_ids in [(source, "2", ["0", "1", "3"]), (stream, "1/0", ["0/0", "0/1", "1/1"])]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.data"):
            examples = list(MatpacPretrainingDataset(clips, shuffle=False, infinite=False))
        assert [example["clip_id"] for example in examples] == kept_ids
        assert [example["num_skipped_corrupt"] for example in examples] == [0, 0, 1]
        assert caplog.messages == [f"Skipping undecodable audio clip {null_id}: the row's audio cell is null"]


def test_files_are_named_by_their_absolute_paths_however_they_are_spelled(tmp_path, monkeypatch):
    _write(tmp_path / "audio" / "clip.wav", CROP)
    monkeypatch.chdir(tmp_path / "audio")
    for spelled in ["clip.wav", "./clip.wav", "../audio/clip.wav", tmp_path / "audio" / "clip.wav"]:
        examples = list(MatpacPretrainingDataset([spelled], infinite=False))
        assert [example["clip_id"] for example in examples] == [str(tmp_path / "audio" / "clip.wav")]


def test_audio_folders_are_listed_through_linked_folders_and_unreadable_ones_are_named(tmp_path, monkeypatch, caplog):
    """Before: a linked folder (a corpus assembled from other disks) and an unlistable one were left out silently."""
    _write(tmp_path / "elsewhere" / "a1.wav", 400)
    _write(tmp_path / "train" / "own" / "b.WAV", 400)
    _write(tmp_path / "train" / "locked" / "c.wav", 400)
    (tmp_path / "train" / "setA").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "train" / "own" / "loop").symlink_to(tmp_path / "train")  # listed once, not forever
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    files = list_audio_files(tmp_path / "train")
    assert [path.relative_to(tmp_path / "train").as_posix() for path in files] == ["own/b.WAV", "setA/a1.wav"]
    assert (
        f"Cannot list {tmp_path / 'train' / 'locked'} (Permission denied): its audio files are left out" in caplog.text
    )


def test_batches_hold_model_inputs_and_skip_counts_go_beside_them():
    examples = [
        {
            "input_values": torch.full((80, 608), float(index)),
            "num_skipped_short": index,
            "num_skipped_corrupt": 1,
            "clip_id": str(index),
        }
        for index in range(3)
    ]
    skipped = SkippedClips()
    batch = skipped([dict(example) for example in examples])
    assert batch.keys() == {"input_values"}
    assert batch["input_values"].shape == (3, 80, 608) and batch["input_values"][2, 5, 7] == 2.0
    assert collate_pretraining_batch(examples).keys() == {"input_values"}
    skipped([{"input_values": torch.zeros(80, 608), "num_skipped_short": 5, "num_skipped_corrupt": 0}])
    assert skipped.totals(1) == {"num_skipped_short": 3, "num_skipped_corrupt": 3}
    assert skipped.totals(2) == {"num_skipped_short": 8, "num_skipped_corrupt": 3}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_of_the_batches_read_are_exact_under_workers(tmp_path, num_workers):
    """Batch b comes from worker b % W; the totals of the first n batches equal those of the examples inside them."""
    generate_builtin_corpus(tmp_path / "corpus", num_clips=5)
    sf.write(tmp_path / "corpus" / "short.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "corpus" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    files = list_audio_files(tmp_path / "corpus")
    assert len(files) == 7
    consumers = []
    for worker in range(max(num_workers, 1)):
        dataset = MatpacPretrainingDataset(files, seed=3, rank=worker, world_size=max(num_workers, 1))
        consumers.append(iter(dataset))
    batches = []  # what batch b must count: the skips behind the examples of worker b % W's next batch
    for index in range(6):
        examples = [next(consumers[index % len(consumers)]) for _ in range(2)]
        batches.append([sum(example[name] for example in examples) for name in SKIP_COUNTERS])
    skipped = SkippedClips(num_workers=num_workers)
    dataset = MatpacPretrainingDataset(files, seed=3)
    iterator = iter(DataLoader(dataset, batch_size=2, collate_fn=skipped, num_workers=num_workers))
    for read in range(1, 7):
        batch = next(iterator)
        assert batch.keys() == {"input_values"}
        assert list(skipped.totals(read).values()) == [sum(column) for column in zip(*batches[:read])]
    assert sum(skipped.totals(6).values()) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Distribution over processes and DataLoader workers


def _folder_with_bad_clips(directory: Path, num_valid: int) -> list[Path]:
    for index in range(num_valid):
        _write(directory / f"clip_{index:02d}.wav", 98_000 + 500 * index, seed=index)
    _write(directory / "short.wav", 50_000)
    (directory / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
    return list_audio_files(directory)


def _parquet_shards(directory: Path, rows_per_shard: list[int]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for shard, num_rows in enumerate(rows_per_shard):
        audio = [
            {"bytes": _wav_bytes(98_000 + 100 * row, seed=100 * shard + row), "path": f"{shard}_{row}.wav"}
            for row in range(num_rows)
        ]
        pq.write_table(pa.table({"audio": audio, "label": list(range(num_rows))}), directory / f"{shard:02d}.parquet")
    return sorted(str(path) for path in directory.glob("*.parquet"))


def _read_everything(source, world_size: int, num_workers: int, epoch: int = 1) -> list[dict[str, torch.Tensor]]:
    """The examples of one epoch of each process, each read through a DataLoader with `num_workers` workers."""
    per_rank = []
    for rank in range(world_size):
        dataset = MatpacPretrainingDataset(source, rank=rank, world_size=world_size, infinite=False)
        dataset.set_epoch(epoch)
        per_rank.append(_ids_and_crops(DataLoader(dataset, batch_size=None, num_workers=num_workers)))
    return per_rank


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 0)])
def test_each_clip_is_read_once_per_epoch_by_exactly_one_process_and_worker(tmp_path, world_size, num_workers):
    files = _folder_with_bad_clips(tmp_path, num_valid=9)
    reference = _read_everything(files, world_size=1, num_workers=0)[0]
    assert len(reference) == 9

    per_rank = _read_everything(files, world_size, num_workers)
    counts = Counter(clip_id for crops in per_rank for clip_id in crops)
    assert counts == Counter(reference.keys())  # every valid clip once, across all processes and workers
    assert all(len(crops) >= 2 for crops in per_rank)
    for crops in per_rank:  # the same crops as without sharding
        for clip_id, crop in crops.items():
            assert torch.equal(crop, reference[clip_id])


@pytest.mark.parametrize("rows_per_shard", [[3, 1, 4], [2, 3, 1, 2, 2]], ids=["3-shards", "5-shards"])
def test_streamed_shards_are_split_without_duplicates_or_gaps(tmp_path, rows_per_shard):
    # 3 shards < 4 consumers: every consumer reads every 4th clip; 5 shards: whole shards per consumer.
    files = _parquet_shards(tmp_path / "shards", rows_per_shard)
    source = load_audio_source(data_files=files, streaming=True)
    assert source.num_shards == len(rows_per_shard)

    per_rank = _read_everything(source, world_size=2, num_workers=2)
    counts = Counter(clip_id for crops in per_rank for clip_id in crops)
    expected = Counter(f"{shard}/{row}" for shard, num_rows in enumerate(rows_per_shard) for row in range(num_rows))
    assert counts == expected
    reference = _read_everything(source, world_size=1, num_workers=0)[0]
    for crops in per_rank:
        for clip_id, crop in crops.items():
            assert torch.equal(crop, reference[clip_id])


def test_streamed_clips_meet_new_batch_mates_every_epoch_with_a_reproducible_seed(tmp_path):
    """3 parquet shards of 6 clips streamed by `datasets`, read in batches of 3: the shuffle buffer mixes them anew."""
    source = load_audio_source(data_files=_parquet_shards(tmp_path / "shards", [6, 6, 6]), streaming=True)
    everything = sorted(f"{shard}/{row}" for shard in range(3) for row in range(6))

    def batches(seed: int, epoch: int, shuffle_buffer_size: int = 6) -> list[frozenset[str]]:
        dataset = MatpacPretrainingDataset(source, seed=seed, infinite=False, shuffle_buffer_size=shuffle_buffer_size)
        dataset.set_epoch(epoch)
        ids = [example["clip_id"] for example in dataset]
        assert sorted(ids) == everything  # each clip once per epoch
        return [frozenset(ids[start : start + 3]) for start in range(0, len(ids), 3)]

    first, second = batches(seed=0, epoch=0), batches(seed=0, epoch=1)
    assert batches(seed=0, epoch=0) == first and batches(seed=0, epoch=1) == second  # reproducible
    kept = set(first) & set(second)
    assert len(kept) <= 1, f"{len(kept)} of 6 batches kept their clips from one epoch to the next"
    assert batches(seed=1, epoch=0) != first
    assert any(len({clip.split("/")[0] for clip in batch}) > 1 for batch in first)  # shards meet in a batch
    # Shard order alone (no buffer) leaves every batch as it was: rows 0-2 and 3-5 of each shard, every epoch.
    assert set(batches(seed=0, epoch=0, shuffle_buffer_size=1)) == set(batches(seed=0, epoch=1, shuffle_buffer_size=1))
    # ... but the shards come in another order from epoch to epoch (their order is drawn per epoch, not once).
    shard_orders = [[next(iter(batch)).split("/")[0] for batch in batches(0, epoch, 1)[::2]] for epoch in range(4)]
    assert all(sorted(order) == ["0", "1", "2"] for order in shard_orders) and len(set(map(tuple, shard_orders))) > 1


def test_accelerate_recipe_without_batch_dispatching(tmp_path):
    """The module docstring's recipe: rank-aware datasets, accelerate's `IterableDatasetShard` made a pass-through."""
    files = _folder_with_bad_clips(tmp_path, num_valid=7)

    def clip_ids(rank: int, pass_through: bool) -> list[str]:
        dataset = MatpacPretrainingDataset(files, rank=rank, world_size=2, infinite=False)
        # Batches of one: at the end of a finite epoch, `IterableDatasetShard` pads an incomplete batch with repeats.
        loader = DataLoader(dataset, batch_size=1, collate_fn=_keep_examples)
        loader = prepare_data_loader(
            loader, num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False
        )
        if pass_through:
            loader.dataset.num_processes, loader.dataset.process_index = 1, 0
        return [example["clip_id"] for batch in loader for example in batch]

    read = [clip_id for rank in (0, 1) for clip_id in clip_ids(rank, pass_through=True)]
    assert sorted(read) == [str(path) for path in files if "clip_" in path.name]
    resharded = [clip_id for rank in (0, 1) for clip_id in clip_ids(rank, pass_through=False)]
    assert len(set(resharded)) < 7  # left as is, accelerate would drop part of every process's share


class _CollateWithClipIndex:
    """`collate_pretraining_batch` plus each clip's index in `files`, as a tensor that accelerate can dispatch."""

    def __init__(self, files: list[Path]):
        self.index = {str(path): index for index, path in enumerate(files)}

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_pretraining_batch(examples)
        batch["clip_index"] = torch.tensor([self.index[example["clip_id"]] for example in examples])
        return batch


def _read_under_accelerate(clip_dir: str, output: str, num_steps: int = 6) -> None:
    """Run by each process of `accelerate launch`: read `num_steps` batches with both recipes of pretraining_data."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator(cpu=True)
    files = list_audio_files(clip_dir)
    read = {}
    for recipe in ("dispatch_batches", "per_process"):
        dispatch = recipe == "dispatch_batches"
        rank, world_size = (0, 1) if dispatch else (accelerator.process_index, accelerator.num_processes)
        dataset = MatpacPretrainingDataset(files, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=_CollateWithClipIndex(files))
        loader = prepare_data_loader(
            loader,
            device=accelerator.device,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            put_on_device=True,
            dispatch_batches=dispatch,
        )
        if not dispatch:
            loader.dataset.num_processes, loader.dataset.process_index = 1, 0
        batches = iter(loader)
        steps = [next(batches)["clip_index"].tolist() for _ in range(num_steps)]
        read[recipe] = gather_object([steps])
    if accelerator.is_main_process:
        Path(output).write_text(json.dumps(read))


def test_both_recipes_under_accelerate_launch_read_every_clip_once_per_epoch(tmp_path):
    files = [_write(tmp_path / "clips" / f"{index}.wav", 98_000 + 300 * index, seed=index) for index in range(8)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        __file__, str(tmp_path / "clips"), str(tmp_path / "read.json"),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    for recipe, per_rank in json.loads((tmp_path / "read.json").read_text()).items():
        assert [len(steps) for steps in per_rank] == [6, 6], recipe
        # 2 processes x 2 clips per step: each pair of steps is one epoch of the 8 clips, each clip once.
        for first_step in (0, 2, 4):
            epoch = [index for steps in per_rank for step in steps[first_step : first_step + 2] for index in step]
            assert sorted(epoch) == list(range(len(files))), (recipe, per_rank)


def test_a_consumer_whose_share_of_an_epoch_is_all_short_goes_on_to_the_next(tmp_path):
    """Before: the run stopped at the first epoch whose share for one process held only clips shorter than a crop
    (hours in, on a small source), and stopped there again when resumed."""
    files = [_write(tmp_path / f"long{i}.wav", 120_000) for i in range(2)]
    files += [_write(tmp_path / f"short{i}.wav", 20_000) for i in range(2)]
    shares = [np.random.default_rng([0, epoch]).permutation(4)[0::2].tolist() for epoch in range(8)]
    empty = [epoch for epoch, share in enumerate(shares) if set(share) == {2, 3}]
    assert empty and empty[0] > 0  # rank 0 of 2 meets an epoch of short clips only, after epochs with long ones
    for start in (0, empty[0]):  # from the start, and resumed at that epoch
        dataset = MatpacPretrainingDataset(files, rank=0, world_size=2, seed=0)
        dataset.set_epoch(start)
        expected = [str(files[index]) for share in shares[start:] for index in share if index < 2]
        crops = [crop for crop, _ in zip(dataset, expected)]
        assert [crop["clip_id"] for crop in crops] == expected
        dealt = [index for share in shares[start:] for index in share]
        last_crop = max(position for position, index in enumerate(dealt) if index < 2)
        assert sum(crop["num_skipped_short"] for crop in crops) == sum(index >= 2 for index in dealt[:last_crop])


def test_an_endless_consumer_without_usable_clips_fails_loudly(tmp_path):
    files = [_write(tmp_path / "only.wav", 100_000)]
    assert next(iter(MatpacPretrainingDataset(files, rank=0, world_size=2)))["clip_id"] == str(files[0])
    with pytest.raises(RuntimeError, match="no usable clip in epochs 0 to 1"):
        next(iter(MatpacPretrainingDataset(files, rank=1, world_size=2)))
    assert list(MatpacPretrainingDataset(files, rank=1, world_size=2, infinite=False)) == []


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def _webdataset_shards(directory: Path, rows_per_shard: list[int]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for shard, num_rows in enumerate(rows_per_shard):
        with tarfile.open(directory / f"{shard:02d}.tar", "w") as tar:
            for row in range(num_rows):
                audio = b"corrupt!" if (shard, row) == (0, 1) else _wav_bytes(99_000, seed=row, audio_format="FLAC")
                for name, data in [(f"s{shard}_{row}.flac", audio), (f"s{shard}_{row}.json", b'{"row": %d}' % row)]:
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return sorted(directory.glob("*.tar"))


@pytest.mark.parametrize("streaming", [False, True], ids=["in-cache", "streaming"])
def test_webdataset_shards(tmp_path, streaming):
    _webdataset_shards(tmp_path / "wds", [3, 2])
    source = load_audio_source(data_files=tmp_path / "wds", streaming=streaming, cache_dir=tmp_path / "cache")
    dataset = MatpacPretrainingDataset(source, shuffle=False, infinite=False)

    assert dataset.dataset_size == (None if streaming else 5)
    examples = list(dataset)
    assert len(examples) == 4 and sum(example["num_skipped_corrupt"] for example in examples) == 1
    assert all(example["input_values"].shape == (80, 608) for example in examples)


def _parquet_with_audio_feature(directory: Path, num_rows: int) -> None:
    """Parquet as Hub audio datasets store it: a {bytes, path} column declared as an `Audio` feature."""
    directory.mkdir(parents=True, exist_ok=True)
    audio = [{"bytes": _wav_bytes(150_000, 22050, seed=row), "path": f"{row}.wav"} for row in range(num_rows)]
    features = {"audio": {"_type": "Audio"}, "label": {"dtype": "int64", "_type": "Value"}}
    table = pa.table({"audio": audio, "label": list(range(num_rows))})
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table, directory / "train-00000-of-00001.parquet")


@pytest.mark.parametrize("streaming", [False, True], ids=["in-cache", "streaming"])
def test_parquet_shards(tmp_path, streaming):
    _parquet_shards(tmp_path / "plain", [2, 1])
    _parquet_with_audio_feature(tmp_path / "typed", 3)
    for pattern, num_rows in [(str(tmp_path / "plain" / "*.parquet"), 3), (tmp_path / "typed", 3)]:
        source = load_audio_source(data_files=pattern, streaming=streaming, cache_dir=tmp_path / "cache")
        dataset = MatpacPretrainingDataset(source, infinite=False)
        assert dataset.dataset_size == (None if streaming else num_rows)
        examples = list(dataset)
        assert len(examples) == num_rows
        assert all(example["input_values"].shape == (80, 608) for example in examples)

    with pytest.raises(ValueError, match="no audio column 'sound'.*'audio', 'label'"):
        MatpacPretrainingDataset(source, audio_column="sound")


HUB_README = """---
dataset_info:
  features:
  - name: audio
    dtype: audio
  - name: label
    dtype: int64
  splits:
  - name: train
    num_examples: 3
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
"""


def test_hub_style_dataset_name_streams_by_default(tmp_path):
    """`dataset_name` takes the Hub path of `load_dataset`; a local dataset repository exercises it offline."""
    _parquet_with_audio_feature(tmp_path / "hub_dataset" / "data", 3)
    (tmp_path / "hub_dataset" / "README.md").write_text(HUB_README)
    source = load_audio_source(dataset_name=str(tmp_path / "hub_dataset"), split="train")
    assert type(source).__name__ == "IterableDataset"
    dataset = MatpacPretrainingDataset(source, infinite=False)
    assert dataset.dataset_size == 3  # as the dataset card declares it, so that epochs can be converted to steps
    assert len(list(dataset)) == 3


AUDIOSET_README = """---
dataset_info:
- config_name: full
  features:
  - name: video_id
    dtype: string
  - name: audio
    dtype: audio
  - name: labels
    sequence: string
  - name: human_labels
    sequence: string
  splits:
  - name: bal_train
    num_examples: 2
  - name: unbal_train
    num_examples: 4
  - name: eval
    num_examples: 1
configs:
- config_name: balanced
  default: true
  data_files:
  - split: train
    path: data/bal_train/*.parquet
- config_name: unbalanced
  data_files:
  - split: train
    path: data/unbal_train/*.parquet
- config_name: full
  data_files:
  - split: bal_train
    path: data/bal_train/*.parquet
  - split: unbal_train
    path: data/unbal_train/*.parquet
  - split: eval
    path: data/eval/*.parquet
---
"""


def _audioset_like(root: Path) -> Path:
    """A local copy of agkphysics/AudioSet's layout and columns: 2 balanced, 4 unbalanced (1 short) and 1 eval clip."""
    import datasets

    lengths = {"bal_train": [CROP + 10, CROP + 20], "unbal_train": [CROP, CROP + 5, 16_000, CROP + 7], "eval": [CROP]}
    for split, sizes in lengths.items():
        rows = {
            "video_id": [f"{split}-{row}" for row in range(len(sizes))],
            "audio": [
                {"bytes": _wav_bytes(size, seed=row), "path": f"{split}-{row}.flac"} for row, size in enumerate(sizes)
            ],
            "labels": [["/m/09x0r"]] * len(sizes),
            "human_labels": [["Speech"]] * len(sizes),
        }
        (root / "data" / split).mkdir(parents=True)
        table = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))
        table.to_parquet(root / "data" / split / "00000.parquet")
    (root / "README.md").write_text(AUDIOSET_README)
    return root


def test_audioset_full_config_trains_on_both_training_splits(tmp_path, caplog):
    root = _audioset_like(tmp_path / "AudioSet")
    source = load_audio_source(dataset_name=str(root), dataset_config_name="full", split="bal_train+unbal_train")
    assert source.num_shards == 2
    dataset = MatpacPretrainingDataset(source, infinite=False)
    assert dataset.dataset_size == 6  # the card's counts of both splits, the short clip included
    examples = list(dataset)
    assert len(examples) == 5 and sum(example["num_skipped_short"] for example in examples) == 1
    assert sorted(example["clip_id"] for example in examples) == ["0/0", "0/1", "1/0", "1/1", "1/3"]

    with caplog.at_level(logging.WARNING):
        default = load_audio_source(dataset_name=str(root), split="train")
    assert f"No configuration named for the Hub dataset {str(root)!r}" in caplog.text
    assert len(list(MatpacPretrainingDataset(default, infinite=False))) == 2  # the balanced set only


def test_builtin_corpus_is_deterministic_and_usable(tmp_path):
    first = generate_builtin_corpus(tmp_path / "first")
    second = generate_builtin_corpus(tmp_path / "second")
    assert len(first) == 32 and [path.name for path in first] == [path.name for path in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    # 32 different clips (each drawn from its own seed), and the same bytes as every earlier version made.
    assert len({path.read_bytes() for path in first}) == 32
    assert hashlib.sha256(first[0].read_bytes()).hexdigest().startswith("040323bf6092f8d5")
    assert hashlib.sha256(first[1].read_bytes()).hexdigest().startswith("92c5fdcbfd87c76f")
    assert sum(path.stat().st_size for path in first) < 20e6
    other_seed = generate_builtin_corpus(tmp_path / "other", num_clips=2, seed=1)
    assert other_seed[0].read_bytes() != first[0].read_bytes()
    # Generated again, a file as it should be is left alone (before: rewritten, so a stopped cache build of the
    # corpus, which knows its files by size and time, never resumed); another one is written over.
    times = {path: path.stat().st_mtime_ns for path in first}
    os.utime(first[1], ns=(0, 0))
    first[0].write_bytes(b"damaged")
    again = generate_builtin_corpus(tmp_path / "first")
    assert [path.stat().st_mtime_ns for path in again[2:]] == [times[path] for path in first[2:]]
    assert first[1].stat().st_mtime_ns == 0 and first[0].read_bytes() == second[0].read_bytes()

    infos = [sf.info(path) for path in first]
    assert {info.samplerate for info in infos} == {16000, 22050, 44100}
    assert {info.channels for info in infos} == {1, 2}
    assert all(6.5 <= info.duration <= 8.0 for info in infos)
    examples = list(MatpacPretrainingDataset(list_audio_files(tmp_path / "first"), infinite=False))
    assert len(examples) == 32 and sum(example["num_skipped_short"] for example in examples) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_sources_fail_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_audio_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No audio file"):
        list_audio_files(tmp_path / "empty")
    _parquet_shards(tmp_path / "shards", [1])
    with pytest.raises(ValueError, match="pass them as `data_files`"):
        load_audio_source(data_dir=tmp_path / "shards")

    with pytest.raises(ValueError, match="exactly one audio source.*got none"):
        load_audio_source()
    with pytest.raises(ValueError, match="got dataset_name, data_dir"):
        load_audio_source(dataset_name="some/dataset", data_dir=tmp_path)
    with pytest.raises(ValueError, match="only applies to a Hub dataset"):
        load_audio_source(dataset_config_name="balanced", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="No shard file matches"):
        load_audio_source(data_files=str(tmp_path / "nowhere" / "*.parquet"))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"all be parquet .* or all webdataset .*\['\.csv'\]"):
        load_audio_source(data_files=tmp_path / "table.csv")

    files = [_write(tmp_path / "clip.wav", 100_000)]
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        MatpacPretrainingDataset(files, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        MatpacPretrainingDataset([])
    with pytest.raises(TypeError, match="list of audio file paths"):
        MatpacPretrainingDataset(str(tmp_path))
    # Before: byte paths and audio content were all skipped as undecodable, each in a warning as long as the file.
    with pytest.raises(TypeError, match="item 1 is a bytes: decode byte paths with os.fsdecode"):
        MatpacPretrainingDataset([files[0], os.fsencode(files[0])])
    with pytest.raises(TypeError, match="item 0 is a ndarray"):
        MatpacPretrainingDataset([np.zeros(16000)])
    with pytest.raises(ValueError, match="non-negative"):
        MatpacPretrainingDataset(files).set_epoch(-1)


if __name__ == "__main__":
    _read_under_accelerate(*sys.argv[1:])
