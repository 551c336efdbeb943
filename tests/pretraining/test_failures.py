"""Issue 11: no input, fault or flag loses a run or a result silently."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_config_kwargs
from pretraining_worker import FixedCrops, tiny_model
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainingArguments

from modeling_matpac import MatpacForPreTraining
from modeling_matpac.atomic_write import replace_when_written
from modeling_matpac.audio import AudioDecodeError, decode_mono_16k
from modeling_matpac.pretraining import MatpacPretrainingDataset, MatpacTrainer, NonFiniteTrainingError
from modeling_matpac.pretraining.checkpoints import checkpoint_problem, checkpoint_steps, last_complete_checkpoint
from modeling_matpac.pretraining.data import NoUsableClipError


ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))
import run_pretraining  # noqa: E402


TINY = ",".join(f"{name}={value}" for name, value in tiny_config_kwargs().items())


# ---------------------------------------------------------------------------------------------------------------------
# 1. Non-finite values


class PoisonedCrops(FixedCrops):
    """Fixed crops that turn NaN once `poisoned` is set (this process reads them: no DataLoader workers)."""

    poisoned = False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = super().__getitem__(index)
        if PoisonedCrops.poisoned:
            example["input_values"] = torch.full_like(example["input_values"], float("nan"))
        return example


class PoisonAfterStep2(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        PoisonedCrops.poisoned = state.global_step >= 2


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, logging_steps):
    """Before: the run went on, logged `loss` 0 and saved NaN weights over checkpoint-2's, then exited 0."""
    monkeypatch.setattr(PoisonedCrops, "poisoned", False)
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=2, max_steps=6, learning_rate=1e-3, logging_steps=logging_steps,
        save_steps=2, save_total_limit=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = MatpacTrainer(model=tiny_model(), args=args, train_dataset=PoisonedCrops())
    trainer.add_callback(PoisonAfterStep2())
    with pytest.raises(NonFiniteTrainingError, match=r"step [34]: .*last good checkpoint, .*checkpoint-2"):
        trainer.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if logging_steps == 1:  # the NaN step is logged as NaN, not as 0
        assert len(logged) >= 3 and all(loss > 1 for loss in logged[:-1]) and math.isnan(logged[-1])


def test_huge_or_non_finite_samples_are_skipped_and_counted_like_corrupt_files(tmp_path):
    """Before: a float WAV of 1e18 samples decoded fine and gave infinite log-mels, hence NaN weights."""
    rng = np.random.default_rng(0)
    good = tmp_path / "good.wav"
    sf.write(good, 0.1 * rng.standard_normal(7 * 16000), 16000, subtype="FLOAT")
    huge = tmp_path / "huge.wav"
    sf.write(huge, 1e18 * rng.standard_normal(7 * 16000), 16000, subtype="DOUBLE")
    with pytest.raises(AudioDecodeError, match="magnitude 4.*e\\+18, beyond 1000"):
        decode_mono_16k(huge)
    negative = tmp_path / "negative.wav"  # the magnitude, not the largest value: all-negative samples are huge too
    sf.write(negative, -1e18 * np.abs(rng.standard_normal(16000)), 16000, subtype="DOUBLE")
    with pytest.raises(AudioDecodeError, match="magnitude .*e\\+18, beyond 1000"):
        decode_mono_16k(negative)
    dataset = MatpacPretrainingDataset([good, huge], shuffle=False, infinite=False)
    examples = list(dataset)
    assert [example["clip_id"] for example in examples] == [str(good)]
    assert examples[0]["num_skipped_corrupt"] == 0 and torch.isfinite(examples[0]["input_values"]).all()
    # the skip is counted with the next example
    dataset = MatpacPretrainingDataset([huge, good], shuffle=False, infinite=False)
    assert [example["num_skipped_corrupt"] for example in dataset] == [1]


def test_the_feature_extractor_refuses_huge_samples_instead_of_returning_nan(tmp_path):
    """Before: the extractor returned infinite log-mels and the model a NaN embedding, without error."""
    from modeling_matpac import MatpacFeatureExtractor

    clips = [np.zeros(16000, np.float32), np.full(16000, 1e18, np.float32)]
    with pytest.raises(ValueError, match=r"beyond \+-1000 \(clip indices \[1\]\)"):
        MatpacFeatureExtractor()(clips, sampling_rate=16000)
    loud = MatpacFeatureExtractor()([np.full(16000, 999.0, np.float32)], sampling_rate=16000, return_tensors="pt")
    assert torch.isfinite(loud["input_values"]).all()


def test_a_cache_shard_with_nan_log_mels_is_skipped_and_counted(tmp_path, caplog):
    """Before: the NaN crop went into a batch and turned the weights NaN."""
    from modeling_matpac.pretraining import LogMelCache, MatpacLogMelCacheDataset, preprocess_to_cache

    rng = np.random.default_rng(0)
    files = []
    for index in range(2):
        files.append(tmp_path / f"clip{index}.wav")
        sf.write(files[-1], 0.1 * rng.standard_normal(8 * 16000), 16000)
    preprocess_to_cache(files, tmp_path / "cache")
    _, log_mel = LogMelCache(tmp_path / "cache")[0]
    shard = next((tmp_path / "cache").glob("logmels-*.arrow"))
    data = shard.read_bytes()
    start = data.index(log_mel.tobytes()[:64])
    shard.write_bytes(data[:start] + b"\x00\x7e" * (log_mel.size) + data[start + 2 * log_mel.size :])
    dataset = MatpacLogMelCacheDataset(tmp_path / "cache", shuffle=False, infinite=False)
    with caplog.at_level(logging.WARNING):
        examples = list(dataset)
    assert [example["clip_id"] for example in examples] == [str(files[1])]
    assert examples[0]["num_skipped_corrupt"] == 1
    assert caplog.messages == [  # the audio file is fine: the cache is not
        f"Skipping the damaged cached log-mel (rebuild the cache to use it again) of {files[0]}: its log-mel crop has "
        "NaN or infinite values"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Any sample rate in bounded memory


def test_every_rate_from_1_to_384_khz_gets_a_bounded_kernel_and_common_rates_stay_exact():
    from modeling_matpac.audio import RESAMPLING_MAX_KERNEL_VALUES, _kernel_values, _resampling_ratio

    worst = 0.0
    for rate in range(1000, 384_001):
        orig, new = _resampling_ratio.__wrapped__(rate, 16000)
        assert _kernel_values(orig, new) <= RESAMPLING_MAX_KERNEL_VALUES, rate
        worst = max(worst, abs(orig * 16000 - new * rate) / (new * rate))
    print(f"largest relative rate error: {worst:.3g}")
    assert worst <= 5.1e-4
    for rate in (8000, 11025, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000, 352800, 384000):
        divisor = math.gcd(rate, 16000)
        assert _resampling_ratio(rate, 16000) == (rate // divisor, 16000 // divisor)


RESAMPLE_SCRIPT = """
import sys, numpy as np, torch
from modeling_matpac.audio import resample
rate = int(sys.argv[1])
t = np.arange(2 * rate) / rate
out = resample(torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32)), rate, 16000)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) / 1024  # this process's peak resident memory (MB), unlike ru_maxrss not
# inherited from the forking pytest process
spectrum = np.abs(np.fft.rfft(out.numpy()[4000:-4000] * np.hanning(len(out) - 8000)))
print(peak, tuple(out.shape)[0], np.argmax(spectrum) * 16000 / (len(out) - 8000))
"""


@pytest.mark.parametrize("rate", [16001, 44101])
def test_near_coprime_rates_resample_in_bounded_memory(tmp_path, rate):
    """Before: 16,001 Hz built a 16,000 x 16,137 kernel (5.5 GB, 49 s); 44,101 Hz allocated 12 GB and crashed."""
    root = ROOT
    result = subprocess.run(
        [sys.executable, "-c", RESAMPLE_SCRIPT, str(rate)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)}, cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak_mb, length, tone = map(float, result.stdout.split())
    print(f"{rate} Hz: peak RSS {peak_mb:.0f} MB, tone at {tone:.1f} Hz")
    assert peak_mb < 1000 and abs(length - 32000) <= 32000 * 5.1e-4 + 1 and abs(tone - 1000) < 2


# ---------------------------------------------------------------------------------------------------------------------
# 3. Crops read only the frames they need


class FixedStart:
    """Stands for the crop's random generator: the start sample to use."""

    def __init__(self, start: int):
        self.start = start

    def integers(self, high: int) -> int:
        assert 0 <= self.start < high
        return self.start


@pytest.mark.parametrize(
    "suffix, rate, channels", [(".wav", 44100, 2), (".flac", 22050, 1), (".wav", 16000, 1), (".ogg", 48000, 2)]
)
def test_a_crop_equals_the_same_samples_of_the_whole_resampled_clip(tmp_path, suffix, rate, channels):
    from modeling_matpac.audio import decode_mono_16k_crop

    path = tmp_path / f"clip{suffix}"
    rng = np.random.default_rng(rate)
    sf.write(path, 0.3 * rng.standard_normal((int(9.3 * rate), channels)), rate)
    whole = decode_mono_16k(path)
    crop_length = 97_520
    for start in (0, 1, 12_345, 40_000, whole.shape[-1] - crop_length):
        crop = decode_mono_16k_crop(path, crop_length, FixedStart(start))
        torch.testing.assert_close(crop, whole[start : start + crop_length], atol=2e-6, rtol=0)
    assert decode_mono_16k_crop(path, whole.shape[-1] + 1, FixedStart(0)) is None


def test_a_crop_of_a_long_file_reads_a_crop_worth_of_audio(tmp_path):
    """Before: every crop decoded the whole file (3.3 GB and 8 s per crop for an hour of 44.1 kHz stereo)."""
    import tracemalloc

    from modeling_matpac.audio import decode_mono_16k_crop

    path = tmp_path / "long.wav"
    seconds = 180
    samples = (np.sin(np.arange(seconds * 44100) / 7.0)[:, None] * np.array([[8000, 4000]])).astype(np.int16)
    sf.write(path, samples, 44100, subtype="PCM_16")
    del samples
    tracemalloc.start()
    crop = decode_mono_16k_crop(path, 97_520, np.random.default_rng(0))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    whole_decode = seconds * 44100 * 2 * 4  # float32 samples of the whole file: 63.5 MB
    print(f"crop of a {seconds} s file: peak traced {peak / 1e6:.1f} MB (whole decode: {whole_decode / 1e6} MB)")
    assert crop.shape == (97_520,) and peak < 6e6


def test_files_cut_short_or_damaged_are_read_alike_in_every_epoch_or_skipped(tmp_path):
    """
    Before: a cut or damaged FLAC crashed the run (a seek's LibsndfileError) in the epochs whose crop fell past the
    damage, and an MP3 cut short was used or skipped by epoch, while the log-mel cache kept it.
    """
    from modeling_matpac.audio import AudioDecodeError, decode_mono_16k_crop, decode_mono_16k_windows

    rng = np.random.default_rng(1)
    audio = 0.3 * np.sin(np.arange(20 * 44100) / 9.0) + 0.05 * rng.standard_normal(20 * 44100)
    sf.write(tmp_path / "full.mp3", audio, 44100, format="MP3")
    sf.write(tmp_path / "full.flac", audio, 44100)
    mp3, flac = (tmp_path / "full.mp3").read_bytes(), bytearray((tmp_path / "full.flac").read_bytes())
    (tmp_path / "cut.mp3").write_bytes(mp3[: len(mp3) // 2])
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    flac[len(flac) // 2 : len(flac) // 2 + 20000] = rng.bytes(20000)
    (tmp_path / "damaged.flac").write_bytes(flac)
    crop_length = 97_520

    # What the MP3 holds, about 10 s of its header's 20, in every epoch and in the cache's windows.
    held = decode_mono_16k(tmp_path / "cut.mp3")
    assert 9.5 * 16000 < held.shape[-1] < 10.5 * 16000
    for epoch in range(12):
        crop = decode_mono_16k_crop(tmp_path / "cut.mp3", crop_length, np.random.default_rng(epoch))
        start = np.random.default_rng(epoch).integers(held.shape[-1] - crop_length + 1)
        torch.testing.assert_close(crop, held[start : start + crop_length], atol=0, rtol=0)
    windows = decode_mono_16k_windows(tmp_path / "cut.mp3", step=16000, overlap=240, whole_below=0)
    torch.testing.assert_close(next(iter(windows)), held[: 16000 + 240], atol=0, rtol=0)

    # The FLAC cut mid-frame does not decode: skipped in every epoch. The damaged one may be, never a crash.
    outcomes = {"cut.flac": set(), "damaged.flac": set()}
    for name, seen in outcomes.items():
        for epoch in range(12):
            try:
                crop = decode_mono_16k_crop(tmp_path / name, crop_length, np.random.default_rng(epoch))
                seen.add("crop" if crop.shape == (crop_length,) else "wrong shape")
            except AudioDecodeError:
                seen.add("skipped")
    assert outcomes == {"cut.flac": {"skipped"}, "damaged.flac": {"crop", "skipped"}}


# ---------------------------------------------------------------------------------------------------------------------
# 4, 5 and 6: output folders, interrupted writes, bad flags


def run_main(output_dir, *flags: str) -> None:
    run_pretraining.main(
        ["--output_dir", str(output_dir), "--config_overrides", TINY, "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--save_steps", "1", "--save_total_limit", "3", "--builtin_corpus_clips", "4",
         "--disable_tqdm", "True", *flags]
    )  # fmt: skip


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def global_step(checkpoint) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten_and_resume_skips_a_broken_checkpoint(
    tmp_path, caplog
):
    """
    Before: a second run into the folder mixed its checkpoints with the first's (or rotated them away), and resuming
    from a checkpoint whose trainer_state.json a kill left empty failed with "Expecting value: line 1 column 1".
    """
    output_dir = tmp_path / "run"
    trainer_logger = logging.getLogger("transformers.trainer")
    handler = RecordingHandler()
    trainer_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_main(output_dir, "--max_steps", "2")
    finally:
        trainer_logger.removeHandler(handler)
    assert not [warning for warning in caught if "pin_memory" in str(warning.message)]
    assert "  Total optimization steps = 2" in handler.messages
    assert not [message for message in handler.messages if f"{sys.maxsize:,}" in message]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # "last", and the Trainer's own "true", in any case, name the last complete checkpoint.
    for spelling in ("last", "Last", "true", "True"):
        args = run_pretraining.MatpacTrainingArguments(str(output_dir), resume_from_checkpoint=spelling)
        run_pretraining.resolve_resume(args)
        assert args.resume_from_checkpoint == str(output_dir / "checkpoint-2"), spelling

    with pytest.raises(ValueError, match=r"already holds the checkpoints of a run \(last: .*checkpoint-2\)"):
        run_main(output_dir, "--max_steps", "2")
    # The run's final folder has the weights and trainer_state.json but no optimizer or scheduler state: resuming
    # from it restarted AdamW and the warm-up without a word.
    with pytest.raises(
        ValueError, match=r"'.*run' is not a complete checkpoint: it has no optimizer.pt or scheduler.pt"
    ):
        run_main(tmp_path / "continued", "--max_steps", "4", "--resume_from_checkpoint", str(output_dir))
    assert not (tmp_path / "continued" / "model.safetensors").exists()

    (output_dir / "checkpoint-2" / "trainer_state.json").write_text("")  # killed while saving
    with pytest.raises(
        ValueError, match="checkpoint-2' is not a complete checkpoint: its trainer_state.json is empty"
    ):
        run_main(output_dir, "--max_steps", "3", "--resume_from_checkpoint", str(output_dir / "checkpoint-2"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_main(output_dir, "--max_steps", "3", "--resume_from_checkpoint", "last")
    assert "Skipping the incomplete checkpoint" in caplog.text and "checkpoint-2" in caplog.text
    assert global_step(output_dir / "checkpoint-3") == 3 and global_step(output_dir / "checkpoint-2") == 2
    # Another config went on silently (here another mask ratio) or loaded the weights into another model.
    with pytest.raises(ValueError, match=r"continues a run of another config: mask_ratio 0.7 \(now 0.5\)\. Resume"):
        overrides = f"{TINY},mask_ratio=0.5"
        run_main(output_dir, "--max_steps", "4", "--resume_from_checkpoint", "last", "--config_overrides", overrides)
    assert not (output_dir / "checkpoint-4").exists()

    run_main(output_dir, "--max_steps", "1", "--overwrite_output_dir")
    assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-1"]
    assert global_step(output_dir / "checkpoint-1") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="runs are locked with flock")
def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    """Before: two runs on one folder both ran: one's results overwrote the other's, or its rotation removed them."""
    import fcntl

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    other_run = os.open(output_dir, os.O_RDONLY)
    fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(OSError, match="'.*run' is in use by another run of run_pretraining.py: wait for it"):
            run_main(output_dir, "--max_steps", "1")
        with pytest.raises(OSError, match="is in use by another run"):
            run_main(output_dir, "--max_steps", "1", "--resume_from_checkpoint", "last")
    finally:
        os.close(other_run)
    assert list(output_dir.iterdir()) == []  # nothing written while the folder was held
    run_main(output_dir, "--max_steps", "1")
    run_main(output_dir, "--max_steps", "2", "--resume_from_checkpoint", "last")  # the first run let go of it
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2


def test_a_resume_from_an_earlier_checkpoint_is_refused_while_later_ones_would_be_written_over(tmp_path):
    """
    Before: the resumed run wrote its checkpoints over the later ones file by file; stopped in the middle, it left a
    folder of two runs (one's weights, the other's optimizer and state) that read as complete.
    """
    output_dir = tmp_path / "run"
    run_main(output_dir, "--max_steps", "3")
    earlier = str(output_dir / "checkpoint-1")
    later = r"continues from step 1, but --output_dir holds later checkpoints \(checkpoint-2, checkpoint-3\), which"
    with pytest.raises(ValueError, match=later):
        run_main(output_dir, "--max_steps", "3", "--resume_from_checkpoint", earlier, "--learning_rate", "1e-4")
    for name in ("checkpoint-2", "checkpoint-3"):
        (output_dir / name).rename(tmp_path / name)
    run_main(output_dir, "--max_steps", "3", "--resume_from_checkpoint", earlier, "--learning_rate", "1e-4")
    assert json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_a_run_resumed_at_its_last_step_writes_its_final_model_without_training(tmp_path, caplog, monkeypatch):
    """
    Before: a run stopped while it wrote its final model (or a job run again) trained one step past its end on
    resuming, then waited 60 s for skip counts of batches never read and ended in a traceback, its model unwritten.
    """
    output_dir = tmp_path / "run"
    run_main(output_dir, "--max_steps", "2")
    final = load_file(output_dir / "model.safetensors")
    (output_dir / "model.safetensors").unlink()
    steps = []
    forward = MatpacForPreTraining.forward
    monkeypatch.setattr(
        MatpacForPreTraining,
        "forward",
        lambda self, *a, step=None, **k: steps.append(step) or forward(self, *a, step=step, **k),
    )
    with caplog.at_level(logging.WARNING):
        run_main(output_dir, "--max_steps", "2", "--resume_from_checkpoint", "last")
    assert steps == []
    assert "checkpoint-2 holds step 2 of this run's 2: nothing to train, the model is the checkpoint's." in caplog.text
    written = load_file(output_dir / "model.safetensors")
    assert written.keys() == final.keys() and all(torch.equal(written[name], final[name]) for name in final)
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2


def test_a_resume_with_another_global_batch_says_so(tmp_path, caplog):
    """Before: a changed per-device batch drew the Trainer's warning; more accumulation steps or processes, none."""
    output_dir = tmp_path / "run"
    run_main(output_dir, "--max_steps", "2")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_main(
            output_dir, "--max_steps", "3", "--resume_from_checkpoint", "last", "--gradient_accumulation_steps", "2"
        )
    assert (
        "This run resumes at step 2 with a global batch of 4 clips (2 per device x 2 accumulation steps x 1 "
        "processes); the checkpoint's run had 2." in caplog.text
    )
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["_GlobalBatchRecord"]["args"] == {"size": 4}
    # Before: another length, warm-up or learning rate bent the schedules at the resumed step without a word.
    assert "resumes at step 2 of a run with another schedule: max_steps 2 (now 3)." in caplog.text
    schedule = {"max_steps": 3, "learning_rate": 0.001, "lr_scheduler_type": "cosine", "warmup_steps": 60}  # built-in
    assert state["stateful_callbacks"]["_ScheduleRecord"]["args"] == schedule
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_main(
            output_dir, "--max_steps", "4", "--resume_from_checkpoint", "last", "--gradient_accumulation_steps", "2",
            "--learning_rate", "1e-4", "--warmup_steps", "1",
        )  # fmt: skip
    assert (
        "resumes at step 3 of a run with another schedule: max_steps 3 (now 4), learning_rate 0.001 (now 0.0001), "
        "warmup_steps 60.0 (now 1.0)." in caplog.text
    )
    # The resumed step's rate is the new schedule's, 1e-4 x (1 + cos(pi (3 - 1) / (4 - 1))) / 2. Before: the first
    # update used the checkpoint's rate (5e-5), and every later one the checkpoint's peak rate (1e-3) on the new shape.
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["log_history"][-1]["learning_rate"] == pytest.approx(2.5e-5, rel=1e-12)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "model.safetensors").write_bytes(b"junk"), "its model.safetensors is damaged"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:-50]), "its optimizer.pt is"),
        (lambda c: (c / "scheduler.pt").write_bytes(b"junk"), "its scheduler.pt is damaged or truncated"),
        (lambda c: (c / "rng_state.pth").write_bytes(b"junk"), "its rng_state.pth is damaged or truncated"),
        (lambda c: (c / "trainer_state.json").write_text("{}"), "its trainer_state.json records no global_step"),
        (lambda c: (c / "config.json").unlink(), "it has no config.json"),
    ],
)
def test_a_checkpoint_with_a_damaged_file_is_refused_and_skipped(tmp_path, caplog, damage, problem):
    """Before: SafetensorError, PytorchStreamReader, KeyError or TypeError tracebacks, or a default config compared."""
    output_dir = tmp_path / "run"
    run_main(output_dir, "--max_steps", "2")
    damage(output_dir / "checkpoint-2")
    with pytest.raises(ValueError, match=f"checkpoint-2' is not a complete checkpoint: {problem}"):
        run_main(output_dir, "--max_steps", "2", "--resume_from_checkpoint", str(output_dir / "checkpoint-2"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_pretraining.resolve_resume(
            run_pretraining.MatpacTrainingArguments(str(output_dir), resume_from_checkpoint="last")
        )
    assert f"Skipping the incomplete checkpoint {output_dir / 'checkpoint-2'}: {problem}" in caplog.text


def _checkpoint(directory: Path, step: int, rng_states: tuple[str, ...] = ("rng_state.pth",)) -> Path:
    """A small checkpoint holding every file `checkpoint_problem` looks for, each readable."""
    directory.mkdir(parents=True)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (directory / "config.json").write_text("{}")
    save_file({"weight": torch.zeros(2)}, directory / "model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", *rng_states):
        torch.save({"step": step}, directory / name)
    return directory


def test_the_last_complete_checkpoint_has_the_most_steps_whatever_the_names_sort(tmp_path, caplog):
    """
    checkpoint-10 sorts before checkpoint-9 by name; a folder stopped before its trainer_state.json is skipped with
    the reason, and folders or files that are not checkpoints of a step are left out.
    """
    for step in (9, 10):
        _checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-11").mkdir()
    (tmp_path / "checkpoint-tmp").mkdir()
    (tmp_path / "checkpoint-12").write_text("a file")
    assert checkpoint_steps(tmp_path) == {
        tmp_path / "checkpoint-9": 9,
        tmp_path / "checkpoint-10": 10,
        tmp_path / "checkpoint-11": 11,
    }
    with caplog.at_level(logging.WARNING, logger="modeling_matpac.pretraining.checkpoints"):
        assert last_complete_checkpoint(tmp_path, warn=True) == tmp_path / "checkpoint-10"
    assert caplog.messages == [
        f"Skipping the incomplete checkpoint {tmp_path / 'checkpoint-11'}: it has no trainer_state.json (the run was "
        "stopped while saving it)."
    ]
    assert checkpoint_steps(tmp_path / "missing") == {} and last_complete_checkpoint(tmp_path / "missing") is None


def test_the_rng_states_of_every_process_and_sharded_weights_are_checked(tmp_path):
    """
    A run of several processes saves rng_state_0.pth, rng_state_1.pth, ...: a damaged one of any process makes its
    checkpoint incomplete. Weights saved in shards with an index are weights, and their shards are checked too.
    """
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", 4, rng_states=("rng_state_0.pth", "rng_state_1.pth"))
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "rng_state_1.pth").write_bytes(b"junk")
    assert checkpoint_problem(checkpoint) == "its rng_state_1.pth is damaged or truncated"

    sharded = _checkpoint(tmp_path / "checkpoint-5", 5)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"weight": "model-00001-of-00001.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(sharded) is None
    (sharded / "model-00001-of-00001.safetensors").write_bytes(b"junk")
    assert checkpoint_problem(sharded).startswith("its model-00001-of-00001.safetensors is damaged (")


def test_a_file_is_written_beside_its_final_name_then_renamed_over_it(tmp_path, monkeypatch):
    """
    A rename replaces a file at once only within one file system: the partial file goes beside the final one (hidden,
    with its suffix), not in the current directory, and readers see the previous content until the rename.
    """
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = tmp_path / "results" / "report.json"
    path.parent.mkdir()
    path.write_text("old")
    with replace_when_written(path) as partial:
        assert partial.parent == path.parent and partial.name.startswith(".report.json.") and partial.suffix == ".json"
        partial.write_text("new")
        assert path.read_text() == "old"
    assert path.read_text() == "new" and list(path.parent.iterdir()) == [path] and list(elsewhere.iterdir()) == []


def test_a_failed_checkpoint_save_ends_in_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch):
    """Before: a disk that filled while a checkpoint was saved ended in a SafetensorError or OSError traceback."""
    save = MatpacTrainer._save_checkpoint

    def filling_disk(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise OSError(28, "No space left on device")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(MatpacTrainer, "_save_checkpoint", filling_disk)
    with pytest.raises(OSError, match=r"No space left on device \(the last complete checkpoint is .*-1\)\.$"):
        run_main(tmp_path / "run", "--max_steps", "3")
    monkeypatch.setattr(MatpacTrainer, "_save_checkpoint", save)

    # Before: a traceback. torch.save (the optimizer state) reports a full disk as its zip writer's RuntimeError.
    torch_save = torch.save

    def full_disk_torch_save(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_torch_save)
    with pytest.raises(
        OSError,
        match=r"Writing checkpoint-2 failed: .*unexpected pos 64 vs 0 \([\d,]+ MB free on its disk\) "
        r"\(the last complete checkpoint is .*checkpoint-1\)\.$",
    ):
        run_main(tmp_path / "torch-save", "--max_steps", "3")


def test_a_failed_cache_rebuild_keeps_the_previous_cache_and_a_truncated_shard_is_named(tmp_path):
    """
    Before: `--overwrite_cache` deleted the old cache before the new build succeeded, and a truncated shard gave a
    pyarrow traceback mid-epoch, naming no file.
    """
    from modeling_matpac.pretraining import LogMelCache, MatpacLogMelCacheDataset, preprocess_to_cache

    rng = np.random.default_rng(0)
    files = []
    for index in range(3):
        files.append(tmp_path / f"clip{index}.wav")
        sf.write(files[-1], 0.1 * rng.standard_normal(7 * 16000), 16000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF no audio")
    cache = tmp_path / "cache"
    preprocess_to_cache(files, cache, shard_size=2)
    with pytest.raises(ValueError, match="No clip of the source is usable"):
        preprocess_to_cache([broken], cache, overwrite=True)
    assert (
        len(LogMelCache(cache)) == 3 and sorted(path.name for path in tmp_path.iterdir() if path.name[0] == ".") == []
    )

    shard = cache / "logmels-00001-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard .*logmels-00001-of-00002.arrow has [\d,]+ bytes, not the [\d,]+"):
        MatpacLogMelCacheDataset(cache)
    (cache / "metadata.json").write_text("")
    with pytest.raises(ValueError, match=r"metadata.json is not valid JSON"):
        LogMelCache(cache)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
        # The Trainer read both as "train for the epochs": 1,800 steps of the built-in corpus, or a confusing error.
        (["--max_steps", "0"], "--max_steps must be a positive number of steps, or -1 to train for --num_train_"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be positive and finite, got 0."),
        (
            ["--max_steps", "-1", "--num_train_epochs", "inf"],
            "--num_train_epochs must be positive and finite, got inf",
        ),
        (["--warmup_epochs", "-1"], "--warmup_epochs must be at least 0 and finite, got -1."),
        (["--max_grad_norm", "nan"], r"--max_grad_norm must be at least 0 \(0: no clipping\), got nan."),
        (["--teacher_temperature_warmup_epochs", "nan"], "--teacher_temperature_warmup_epochs must be at least 0"),
        (["--train_cache", "{tmp}/out", "--train_dir", "{tmp}/short"], "--train_cache is the data to train on: leave"),
        (
            ["--model_name_or_path", "{tmp}/short"],
            "--model_name_or_path '.*short' is not a model .*has no config.json",
        ),
        (
            ["--model_name_or_path", "{tmp}/no-model", "--preprocess_to", "{tmp}/cache"],
            "--model_name_or_path '.*no-model' is not a model folder",
        ),
        (["--weight_decay", "-0.05"], "--weight_decay must be at least 0, got -0.05."),  # AdamW took it per group
        (["--config_overrides", "hidden_size=32,oops"], r"name=value items .*got \['oops'\]"),
        (["--model_name_or_path", "{tmp}/no-model"], "--model_name_or_path '.*no-model' is not a model folder"),
        (["--fp16", "--use_cpu"], "--fp16 needs a CUDA GPU"),
        # Before: ignored without a word, noise added to the patch embeddings, or liger's ImportError traceback.
        (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor has no labels to smooth"),
        (["--neftune_noise_alpha", "5"], "--neftune_noise_alpha adds noise to a language model's token embeddings"),
        (["--use_liger_kernel"], "--use_liger_kernel patches language-model layers"),
        (["--output_dir", "{tmp}/a-file"], "--output_dir '.*a-file' is a file, not a folder"),
        (["--preprocess_to", "{tmp}/a-file"], "a-file' exists and is not a directory"),
        (["--train_cache", "{tmp}/a-file"], "does not exist or is not a directory"),
        (["--train_dir", "{tmp}/a-file"], "does not exist or is not a directory"),
        (
            ["--train_dir", "{tmp}/corrupt", "--max_steps", "1"],
            r"found no usable clip in epochs 0 to 1 .*2 undecodable",
        ),
        (
            ["--train_dir", "{tmp}/short", "--max_steps", "1"],
            r"found no usable clip in epochs 0 to 1 \(2 shorter than",
        ),
    ],
)
def test_bad_flags_end_in_one_clear_error(tmp_path, flags, message):
    """Before: ZeroDivisionError, tracebacks, a cryptic `dict` message, or --fp16 training in fp32 on the CPU."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.wav").write_bytes(b"RIFF no audio")
    (tmp_path / "short").mkdir()
    sf.write(tmp_path / "short" / "x.wav", np.zeros(16000), 16000)
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    if "--model_name_or_path" in flags:
        arguments = ["--output_dir", str(tmp_path / "out"), *flags]
    else:
        arguments = ["--output_dir", str(tmp_path / "out"), "--config_overrides", TINY, *flags]
    if "--output_dir" in flags[:1]:
        arguments = arguments[2:]
    with pytest.raises((ValueError, OSError, NoUsableClipError), match=message):
        run_pretraining.main(["--warmup_steps", "0", "--teacher_temperature_warmup_steps", "1", *arguments])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0."),
        (
            ["--dataset_name", "someone/unreachable", "--dataset_config_name", "full"],
            "Couldn't reach 'someone/unreachable' on the Hub (OfflineModeIsEnabled)",
        ),
    ],
)
def test_the_command_line_prints_one_line_and_exits_non_zero(flags, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_pretraining.py"), "--output_dir", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"run_pretraining.py: error: {message}"]


def test_ctrl_c_ends_the_script_in_one_line_that_says_how_to_go_on(tmp_path):
    """Before: a KeyboardInterrupt traceback."""
    command = [
        sys.executable, str(ROOT / "run_pretraining.py"), "--output_dir", str(tmp_path), "--config_overrides", TINY,
        "--max_steps", "100000", "--save_steps", "1", "--builtin_corpus_clips", "4",
        "--per_device_train_batch_size", "2", "--disable_tqdm", "True",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not any(tmp_path.glob("checkpoint-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            "run_pretraining.py: interrupted. The same command with --resume_from_checkpoint last continues the run"
        )
    )


def test_sigterm_to_a_run_and_its_workers_saves_a_checkpoint_and_stops(tmp_path):
    """Before: SIGTERM, what a cluster sends before it stops a job, ended the run at once: the work since the last
    checkpoint was lost."""
    command = [
        sys.executable, str(ROOT / "run_pretraining.py"), "--output_dir", str(tmp_path), "--config_overrides", TINY,
        "--max_steps", "100000", "--save_steps", "1000", "--builtin_corpus_clips", "4", "--logging_steps", "5",
        "--per_device_train_batch_size", "2", "--disable_tqdm", "True", "--dataloader_num_workers", "2",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    for line in process.stdout:  # the first step's log line: training is under way
        if "'loss'" in line:
            break
    time.sleep(1)
    os.killpg(process.pid, signal.SIGTERM)  # as a cluster does: the script and its DataLoader workers
    stderr = process.communicate(timeout=240)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    step = int(checkpoints[0].name.split("-")[1])
    assert stderr.strip().splitlines()[-1] == (
        f"run_pretraining.py: stopped by SIGTERM at step {step} of 100000, {checkpoints[0]} saved: the same command "
        "with --resume_from_checkpoint last continues the run."
    )
    assert "Traceback" not in stderr and not (tmp_path / "model.safetensors").exists()  # not a finished run


def test_the_script_tears_its_process_group_down(tmp_path):
    """A distributed run ends by destroying its process group, before the interpreter's exit does it in disorder."""
    code = "; ".join(
        [
            "import torch.distributed as dist",
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)",
            "import run_pretraining",
            f"run_pretraining.main(['--output_dir', {str(tmp_path / 'out')!r}, '--config_overrides', {TINY!r}, "
            "'--max_steps', '1', '--builtin_corpus_clips', '4', '--per_device_train_batch_size', '2'])",
            "print('process group left:', dist.is_initialized())",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process group left: False" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_when_one_process_stops_the_others_say_so_in_one_line(tmp_path):
    """Before: the process left waiting in a collective printed gloo's 'Connection closed by peer' traceback."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    sf.write(corpus / "a.wav", 0.1 * rng.standard_normal(8 * 16000).astype(np.float32), 16000)  # one clip, 2 shares
    # torchrun sends SIGTERM to the other process 0.1 s after one ends (its --monitor-interval): in the race the other
    # one stopped on it before it could say why. Five seconds leave it the time to.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"]
    command += ["--monitor-interval", "5"]
    command += [str(ROOT / "run_pretraining.py"), "--output_dir", str(tmp_path / "out"), "--train_dir", str(corpus)]
    command += ["--config_overrides", TINY, "--max_steps", "2", "--per_device_train_batch_size", "1"]
    command += ["--ddp_backend", "gloo", "--use_cpu", "--disable_tqdm", "true"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("run_pretraining.py: error:")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert "found no usable clip" in errors[0]
    assert "stopped because another process of the run stopped" in errors[1]
    assert "Connection closed by peer" not in result.stderr and "[rank" not in result.stderr


def test_a_distributed_run_stops_on_sigterm_at_one_step_with_one_checkpoint(tmp_path):
    """Before: SIGTERM ended the processes of a distributed run at once, each at its own step: the work since the last
    checkpoint was lost. Now they agree on a step, save it as one checkpoint and stop; the run resumes from it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29538"]
    command += [str(ROOT / "run_pretraining.py"), "--output_dir", str(tmp_path), "--config_overrides", TINY]
    command += ["--max_steps", "100000", "--save_steps", "1000", "--builtin_corpus_clips", "8", "--logging_steps", "5"]
    command += ["--per_device_train_batch_size", "2", "--ddp_backend", "gloo", "--use_cpu", "--disable_tqdm", "true"]
    command += ["--dataloader_num_workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    for line in process.stdout:  # the first step's log line: training is under way in both processes
        if "'loss'" in line:
            break
    time.sleep(1)
    # torchrun passes a SIGTERM on to every process; one that reaches a single process must stop them all as well.
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    workers = [pid for pid in children if b"run_pretraining.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGTERM)
    stderr = process.communicate(timeout=240)[1]
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None, stderr[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert step > 1
    stopped = [line for line in stderr.splitlines() if line.startswith("run_pretraining.py:")]
    assert stopped == 2 * [
        f"run_pretraining.py: stopped by SIGTERM at step {step} of 100000, {checkpoints[0]} saved: the same command "
        "with --resume_from_checkpoint last continues the run."
    ], stderr[-3000:]
    assert "Connection closed by peer" not in stderr and "[rank" not in stderr, stderr[-3000:]
    assert sorted(path.name for path in checkpoints[0].glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not (tmp_path / "model.safetensors").exists()

    resumed = [arg if arg != "100000" else str(step + 2) for arg in command] + ["--resume_from_checkpoint", "last"]
    result = subprocess.run(resumed, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2 and (tmp_path / "model.safetensors").is_file()


def test_an_error_raised_in_a_dataloader_worker_ends_the_script(tmp_path):
    """Before: the line was printed, then the process waited forever for its worker, which ignores SIGTERM (the
    signal Python's exit ends daemonic children with); under DDP the others waited in a collective for 30 min."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(corpus / "short.wav", 0.1 * np.random.default_rng(0).standard_normal(2 * 16000), 16000)
    command = [sys.executable, str(ROOT / "run_pretraining.py"), "--output_dir", str(tmp_path / "out")]
    command += ["--train_dir", str(corpus), "--config_overrides", TINY, "--max_steps", "2"]
    command += ["--per_device_train_batch_size", "1", "--dataloader_num_workers", "1", "--disable_tqdm", "true"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("run_pretraining.py: error: Data consumer 0 of 1 (rank 0 of 1, DataLoader worker 0 of 1)")
    assert "Traceback" not in result.stderr


LIBRARY_LOADER_ERROR = """
import sys
import numpy as np
import soundfile as sf
from pathlib import Path
from transformers import TrainingArguments
from pretraining_worker import tiny_model
from modeling_matpac.pretraining import MatpacPretrainingDataset, MatpacTrainer, collate_pretraining_batch

folder = Path(sys.argv[1])
sf.write(folder / "short.wav", 0.1 * np.random.default_rng(0).standard_normal(2 * 16000), 16000)
args = TrainingArguments(
    output_dir=str(folder / "out"), max_steps=2, per_device_train_batch_size=1, dataloader_num_workers=1,
    use_cpu=True, report_to=[], disable_tqdm=True,
)
trainer = MatpacTrainer(
    model=tiny_model(), args=args, train_dataset=MatpacPretrainingDataset([folder / "short.wav"]),
    data_collator=collate_pretraining_batch,
)
trainer.train()
"""


def test_a_library_run_whose_loader_fails_ends(tmp_path):
    """`MatpacTrainer` outside the script: its workers end with the process (SIGTERM at Python's exit), as before
    the script made them ignore that signal; ignoring it for every user hung a process whose loader raised."""
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY_LOADER_ERROR, str(tmp_path)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [ROOT, ROOT / "tests", Path(__file__).parent]))},
    )  # fmt: skip
    assert result.returncode == 1 and "NoUsableClipError" in result.stderr, result.stderr[-2000:]
