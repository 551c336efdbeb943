"""Tests of the MATPAC front end against the authors' golden outputs (tests/fixtures/frontend.safetensors)."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_matpac.audio import resample
from modeling_matpac.configuration_matpac import FRONT_END_FIELDS, MatpacConfig
from modeling_matpac.feature_extraction_matpac import (
    MatpacFeatureExtractor,
    log_mel_spectrogram,
    mel_filter_bank,
)


FIXTURES = Path(__file__).parents[1] / "fixtures" / "frontend.safetensors"
CLIPS_16K = ["noise_1s", "chirp_6p08s", "mix_10s", "clip_0p5s", "silence_2s"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES)


@pytest.fixture(scope="module")
def fe() -> MatpacFeatureExtractor:
    return MatpacFeatureExtractor()


def wav_16k(ref: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return ref["sr44k_3s.wav_16k"] if name == "sr44k_3s" else ref[f"{name}.wav"]


def max_error(actual, expected) -> float:
    return (torch.as_tensor(np.asarray(actual)) - torch.as_tensor(np.asarray(expected))).abs().max().item()


def n_frames(n_samples: int) -> int:
    return 1 + (n_samples - 400) // 160


# --- golden fixtures -------------------------------------------------------------------------------------------


def test_mel_filter_bank_matches_torchaudio(ref):
    filters = mel_filter_bank()
    error = max_error(filters, ref["torchaudio.mel_fb"])
    print(f"mel filter bank: max abs error {error:.3g}")
    assert filters.shape == (201, 80) and filters.dtype == torch.float32
    assert torch.equal(filters, ref["torchaudio.mel_fb"])


def test_window_matches_torchaudio(ref, fe):
    assert torch.equal(fe.window, ref["torchaudio.window"])
    assert torch.equal(fe.mel_filters, ref["torchaudio.mel_fb"])


@pytest.mark.parametrize("name", CLIPS_16K + ["sr44k_3s"])
def test_log_mel_matches_reference(ref, fe, name):
    waveform = wav_16k(ref, name)
    raw = log_mel_spectrogram(waveform[None], fe.mel_filters, fe.window)
    norm = fe(waveform, sampling_rate=16000, return_tensors="pt")["input_values"]
    raw_error = max_error(raw[0], ref[f"{name}.logmel_raw"])
    norm_error = max_error(norm[0], ref[f"{name}.logmel_norm"])
    print(f"{name}: logmel_raw max abs error {raw_error:.3g}, logmel_norm max abs error {norm_error:.3g}")
    assert raw.shape == (1, 80, n_frames(waveform.shape[-1])) == (1, *ref[f"{name}.logmel_raw"].shape)
    assert norm.shape == raw.shape
    assert raw_error <= ATOL and norm_error <= ATOL


def test_silence_pins_log_floor(ref, fe):
    norm = fe(ref["silence_2s.wav"], sampling_rate=16000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(norm, torch.full_like(norm, (math.log(torch.finfo(torch.float32).eps) + 7.056) / 4.193))


def test_log_offset_sets_the_log_floor(ref):
    """A `log_offset` other than the default is the one added before the log: silence gives log(1e-3), normalised."""
    fe = MatpacFeatureExtractor(log_offset=1e-3)
    norm = fe(ref["silence_2s.wav"], sampling_rate=16000, return_tensors="pt")["input_values"]
    assert norm.shape == (1, 80, 198)
    torch.testing.assert_close(norm, torch.full_like(norm, (math.log(1e-3) + 7.056) / 4.193))


def test_resample_44k_matches_reference(ref):
    resampled = resample(ref["sr44k_3s.wav_44100"], 44100, 16000)
    error = max_error(resampled, ref["sr44k_3s.wav_16k"])
    print(f"resample 44.1k -> 16k: max abs error {error:.3g}")
    assert resampled.shape == (48000,)
    assert error <= ATOL


def test_extractor_resamples_44k_input(ref, fe):
    norm = fe(ref["sr44k_3s.wav_44100"].numpy(), sampling_rate=44100, return_tensors="pt")["input_values"]
    error = max_error(norm[0], ref["sr44k_3s.logmel_norm"])
    print(f"extractor on 44.1k input: logmel_norm max abs error {error:.3g}")
    assert norm.shape == (1, 80, 298)
    assert error <= ATOL


def test_extractor_upsamples_8k_input(ref, fe):
    """Audio below 16 kHz (8 kHz telephone speech) is resampled up too, not read as if it were at 16 kHz."""
    clip = resample(ref["mix_10s.wav"][:32000], 16000, 8000)  # 2 s: 16,000 samples at 8 kHz, 32,000 at 16 kHz
    batch = fe([clip, clip[:4000]], sampling_rate=8000, return_tensors="pt")
    assert batch["input_values"].shape == (2, 80, 198)
    # 1 + (32000 - 400) // 160 and 1 + (8000 - 400) // 160 frames: counted at 16 kHz
    assert batch["attention_mask"].sum(dim=1).tolist() == [198, 48]
    expected = fe.normalized_log_mel(resample(clip, 8000, 16000))
    torch.testing.assert_close(batch["input_values"][0], expected, atol=1e-5, rtol=0)


# --- resampling properties -------------------------------------------------------------------------------------


def test_resample_removes_tones_above_new_nyquist():
    t = torch.arange(44100, dtype=torch.float64) / 44100
    tone = torch.sin(2 * math.pi * 12000 * t).float()
    assert resample(tone, 44100, 16000)[200:-200].abs().max() < 1e-3


def test_resample_upsampling_interpolates_band_limited_signal():
    t8 = torch.arange(8000, dtype=torch.float64) / 8000
    t16 = torch.arange(16000, dtype=torch.float64) / 16000
    upsampled = resample(torch.sin(2 * math.pi * 440 * t8).float(), 8000, 16000)
    assert upsampled.shape == (16000,)
    expected = torch.sin(2 * math.pi * 440 * t16).float()
    torch.testing.assert_close(upsampled[500:-500], expected[500:-500], atol=1e-4, rtol=0)


def test_resample_shapes_batching_and_padding():
    waveform = torch.randn(2, 3, 1001, generator=torch.Generator().manual_seed(0))
    resampled = resample(waveform, 44100, 16000)
    assert resampled.shape == (2, 3, math.ceil(1001 * 16000 / 44100))
    torch.testing.assert_close(resampled[1, 2], resample(waveform[1, 2], 44100, 16000), atol=1e-5, rtol=0)
    # right zero padding leaves the clip's own outputs unchanged: clips of a padded batch resample together
    padded = torch.nn.functional.pad(waveform[0, 0], (0, 5000))
    from_padded = resample(padded, 44100, 16000)[: resampled.shape[-1]]
    torch.testing.assert_close(from_padded, resampled[0, 0], atol=1e-5, rtol=0)
    assert resample(waveform, 16000, 16000) is waveform


def test_resample_kernel_cached_in_inference_mode_still_supports_autograd():
    with torch.inference_mode():
        resample(torch.randn(3000), 22050, 16000)
    waveform = torch.randn(3000, requires_grad=True)
    resample(waveform, 22050, 16000).sum().backward()
    assert waveform.grad is not None and torch.isfinite(waveform.grad).all()


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="`orig_sr` must be a positive whole number"):
        resample(torch.zeros(1000), 0, 16000)
    with pytest.raises(ValueError, match="`new_sr` must be a positive whole number"):
        resample(torch.zeros(1000), 16000, 22050.5)
    with pytest.raises(TypeError, match="floating point waveform"):
        resample(torch.zeros(1000, dtype=torch.int16), 44100, 16000)


# --- log-mel and batching --------------------------------------------------------------------------------------


def test_log_mel_rows_are_independent(ref, fe):
    batch = torch.stack([ref["noise_1s.wav"], ref["mix_10s.wav"][:16000]])
    batched = log_mel_spectrogram(batch, fe.mel_filters, fe.window)
    for row in range(2):
        assert torch.equal(batched[row], log_mel_spectrogram(batch[row], fe.mel_filters, fe.window))
    for n_samples, expected in [(400, 1), (559, 1), (560, 2), (16000, 98)]:
        assert log_mel_spectrogram(torch.zeros(n_samples), fe.mel_filters, fe.window).shape == (80, expected)


def test_long_recordings_are_transformed_in_blocks_of_frames_with_the_same_values(ref, fe, monkeypatch):
    import modeling_matpac.feature_extraction_matpac as feature_extraction

    clips = [wav_16k(ref, name) for name in CLIPS_16K]
    whole = fe(clips, sampling_rate=16000, return_tensors="pt")
    # mix_10s has 998 frames: blocks of 300 cut it into 4 (the last one of 98), chirp_6p08s into 3.
    monkeypatch.setattr(feature_extraction, "FRAMES_PER_BLOCK", 300)
    blocked = fe(clips, sampling_rate=16000, return_tensors="pt")
    assert whole["input_values"].shape == blocked["input_values"].shape == (5, 80, 998)
    assert torch.equal(whole["input_values"], blocked["input_values"])
    assert torch.equal(whole["attention_mask"], blocked["attention_mask"])


@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_features_are_float32_inside_an_autocast_region(ref, fe, return_tensors):
    """Before: bf16 features 0.011 away with "pt", and a TypeError with "np" or None (numpy has no bf16)."""
    clip = ref["mix_10s.wav"]
    expected = fe(clip, sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = fe(clip, sampling_rate=16000, return_tensors=return_tensors)["input_values"]
    features = torch.as_tensor(np.asarray(features[0] if return_tensors is None else features))
    assert features.dtype == torch.float32 and torch.equal(features.reshape(expected.shape), expected)


def test_padded_batch_equals_each_clip_alone(ref, fe):
    clips = [wav_16k(ref, name) for name in CLIPS_16K]
    batch = fe(clips, sampling_rate=16000, return_tensors="pt")
    values, mask = batch["input_values"], batch["attention_mask"]
    lengths = [n_frames(clip.shape[-1]) for clip in clips]
    assert values.shape == (5, 80, max(lengths)) and values.dtype == torch.float32
    assert mask.shape == (5, max(lengths)) and mask.dtype == torch.int32
    for index, (name, length) in enumerate(zip(CLIPS_16K, lengths)):
        assert mask[index].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert max_error(values[index, :, :length], ref[f"{name}.logmel_norm"]) <= ATOL
        alone = fe(clips[index], sampling_rate=16000, return_tensors="pt")["input_values"][0]
        assert torch.equal(values[index, :, :length], alone)
        assert torch.all(values[index, :, length:] == 0.0)


def test_padded_batch_with_resampling(ref):
    fe = MatpacFeatureExtractor(padding_value=-1.5)
    long, short = ref["sr44k_3s.wav_44100"], ref["sr44k_3s.wav_44100"][:50000]
    batch = fe([long, short], sampling_rate=44100, return_tensors="pt")
    short_frames = n_frames(math.ceil(50000 * 16000 / 44100))
    assert batch["attention_mask"].sum(dim=1).tolist() == [298, short_frames]
    alone = fe(short, sampling_rate=44100, return_tensors="pt")["input_values"][0]
    torch.testing.assert_close(batch["input_values"][1, :, :short_frames], alone, atol=1e-5, rtol=0)
    assert torch.all(batch["input_values"][1, :, short_frames:] == -1.5)
    assert max_error(batch["input_values"][0], ref["sr44k_3s.logmel_norm"]) <= ATOL


def test_multichannel_is_averaged_to_mono(ref, fe):
    mono = ref["mix_10s.wav"][:32000]
    other = ref["noise_1s.wav"].repeat(2)
    stereo = torch.stack([mono, other])  # (channels, samples)
    expected = fe(stereo.mean(dim=0), sampling_rate=16000, return_tensors="pt")["input_values"]
    forms = {
        "list channels-first torch": [stereo],
        "list channels-last numpy": [stereo.T.numpy()],
        "list channels-last nested lists": [stereo.T.tolist()],
        "3-D channels-first": stereo[None],
        "3-D channels-last numpy": stereo.T[None].numpy(),
    }
    for form, audio in forms.items():
        actual = fe(audio, sampling_rate=16000, return_tensors="pt")["input_values"]
        assert actual.shape == expected.shape, form
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=form)
    single_channel = fe([mono[None]], sampling_rate=16000, return_tensors="pt")["input_values"]
    assert torch.equal(single_channel, fe(mono, sampling_rate=16000, return_tensors="pt")["input_values"])


def test_mixed_mono_and_stereo_list(ref, fe):
    mono, stereo = ref["noise_1s.wav"], torch.stack([ref["chirp_6p08s.wav"], ref["chirp_6p08s.wav"]], dim=1)
    batch = fe([mono, stereo], sampling_rate=16000, return_tensors="pt")
    assert batch["attention_mask"].sum(dim=1).tolist() == [98, 606]
    torch.testing.assert_close(batch["input_values"][1], ref["chirp_6p08s.logmel_norm"], atol=ATOL, rtol=0)


def test_eight_channels_are_averaged_and_a_ninth_is_refused(ref, fe):
    """`MAX_CHANNELS` is 8: 7.1 audio is a clip of 8 channels, in either layout; 9 leave the channel axis unknown."""
    channels = ref["mix_10s.wav"][:128000].reshape(8, 16000)  # 8 different 1 s channels
    expected = fe(channels.mean(dim=0), sampling_rate=16000, return_tensors="pt")["input_values"]
    assert expected.shape == (1, 80, 98)
    for audio in ([channels], [channels.T.numpy()], channels[None], channels.T[None].numpy()):
        actual = fe(audio, sampling_rate=16000, return_tensors="pt")["input_values"]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    nine = r"Could not tell the channel axis of a multichannel clip of shape \(9, 16000\): expected one axis of at"
    with pytest.raises(ValueError, match=nine):
        fe([np.zeros((9, 16000), np.float32)], sampling_rate=16000)


def test_integer_pcm_is_scaled(ref, fe):
    waveform = ref["mix_10s.wav"].numpy()
    pcm16 = np.clip(np.round(waveform * 32768), -32768, 32767).astype(np.int16)
    from_int = fe(pcm16, sampling_rate=16000, return_tensors="np")["input_values"]
    from_float = fe(pcm16.astype(np.float32) / 32768, sampling_rate=16000, return_tensors="np")["input_values"]
    assert np.array_equal(from_int, from_float)
    # 16-bit quantisation noise (~-101 dBFS) only moves the loud mixture's log-mel slightly
    quantisation_error = max_error(from_int[0], ref["mix_10s.logmel_norm"])
    print(f"int16 PCM vs float reference: max abs error {quantisation_error:.3g}")
    assert quantisation_error < 0.05

    codes = np.random.default_rng(0).integers(0, 256, 4000)
    formats = {
        np.uint8: (codes.astype(np.uint8), (codes - 128) / 128),
        np.int8: ((codes - 128).astype(np.int8), (codes - 128) / 128),
        np.int32: ((codes - 128).astype(np.int32) << 24, (codes - 128) / 128),
        np.int16: (torch.from_numpy((codes - 128).astype(np.int16) << 8), (codes - 128) / 128),
    }
    for dtype, (pcm, expected_float) in formats.items():
        expected = fe(expected_float.astype(np.float32), sampling_rate=16000, return_tensors="np")["input_values"]
        actual = fe(pcm, sampling_rate=16000, return_tensors="np")["input_values"]
        assert np.array_equal(actual, expected), dtype


def test_float64_is_cast_to_float32(ref, fe):
    waveform = ref["clip_0p5s.wav"]
    from_double = fe(waveform.double().numpy(), sampling_rate=16000, return_tensors="pt")["input_values"]
    assert from_double.dtype == torch.float32
    assert torch.equal(from_double, fe(waveform, sampling_rate=16000, return_tensors="pt")["input_values"])


def test_numpy_torch_and_list_inputs_agree(ref, fe):
    clip = ref["clip_0p5s.wav"]
    batch = torch.stack([clip, ref["noise_1s.wav"][:8000]])
    expected_one = fe(clip, sampling_rate=16000, return_tensors="np")["input_values"]
    expected_batch = fe(batch, sampling_rate=16000, return_tensors="np")["input_values"]
    assert expected_one.shape == (1, 80, 48) and expected_batch.shape == (2, 80, 48)
    big_endian = clip.numpy().astype(">f4")
    reversed_view = clip.numpy()[::-1].copy()[::-1]
    for audio in (clip.numpy(), clip.tolist(), tuple(clip.tolist()), big_endian, reversed_view):
        assert np.array_equal(fe(audio, sampling_rate=16000, return_tensors="np")["input_values"], expected_one)
    for audio in (batch.numpy(), batch.tolist(), list(batch), list(batch.numpy()), (batch[0], batch[1].numpy())):
        assert np.array_equal(fe(audio, sampling_rate=16000, return_tensors="np")["input_values"], expected_batch)
    assert np.array_equal(expected_batch[0], expected_one[0])


def test_return_tensors_variants(ref, fe):
    clips = [ref["clip_0p5s.wav"], ref["noise_1s.wav"]]
    as_pt = fe(clips, sampling_rate=16000, return_tensors="pt")
    assert isinstance(as_pt["input_values"], torch.Tensor) and isinstance(as_pt["attention_mask"], torch.Tensor)
    as_np = fe(clips, sampling_rate=16000, return_tensors="np")
    assert isinstance(as_np["input_values"], np.ndarray) and as_np["input_values"].dtype == np.float32
    assert as_np["attention_mask"].dtype == np.int32 and as_np["attention_mask"].shape == (2, 98)
    as_lists = fe(clips, sampling_rate=16000)
    assert isinstance(as_lists["input_values"], list) and len(as_lists["input_values"]) == 2
    assert all(isinstance(item, np.ndarray) and item.shape == (80, 98) for item in as_lists["input_values"])
    assert all(isinstance(item, np.ndarray) and item.shape == (98,) for item in as_lists["attention_mask"])
    for other in (as_np, as_lists):
        assert np.array_equal(np.stack(other["input_values"]), as_pt["input_values"].numpy())
        assert np.array_equal(np.stack(other["attention_mask"]), as_pt["attention_mask"].numpy())
    # BatchFeature converts the list form like any other feature extractor's output
    assert torch.equal(as_lists.convert_to_tensors("pt")["input_values"], as_pt["input_values"])
    without_mask = fe(clips, sampling_rate=16000, return_tensors="pt", return_attention_mask=False)
    assert list(without_mask.keys()) == ["input_values"]
    assert list(MatpacFeatureExtractor(return_attention_mask=False)(clips[0], sampling_rate=16000).keys()) == [
        "input_values"
    ]


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_argument(ref, fe, device):
    out = fe(ref["clip_0p5s.wav"].numpy(), sampling_rate=44100, return_tensors="pt", device=device)
    assert out["input_values"].device == torch.device("cpu") and out["attention_mask"].device == torch.device("cpu")


def test_save_and_load_round_trip(ref, tmp_path):
    fe = MatpacFeatureExtractor(padding_value=-1.0, mean=-6.5, std=4.0, f_min=60.0)
    fe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["feature_extractor_type"] == "MatpacFeatureExtractor"
    assert "mel_filters" not in config and "window" not in config
    loaded = MatpacFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == fe.to_dict()
    assert torch.equal(loaded.mel_filters, fe.mel_filters) and torch.equal(loaded.window, fe.window)
    clips = [ref["clip_0p5s.wav"], ref["noise_1s.wav"]]
    expected = fe(clips, sampling_rate=22050, return_tensors="pt")
    actual = loaded(clips, sampling_rate=22050, return_tensors="pt")
    assert torch.equal(actual["input_values"], expected["input_values"])
    assert torch.equal(actual["attention_mask"], expected["attention_mask"])
    default = MatpacFeatureExtractor()
    default.save_pretrained(tmp_path / "default")
    assert MatpacFeatureExtractor.from_pretrained(tmp_path / "default").to_dict() == default.to_dict()


# --- errors and warnings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audio, match",
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        ([], "empty"),
        ([np.zeros(16000), np.zeros(0)], r"Clip 1 is empty"),
        (torch.zeros(2, 0), "empty"),
        (torch.zeros(1, 2, 0), "empty"),
        (np.zeros(399, dtype=np.float32), r"Clip 0 has 399 samples, shorter than one analysis window"),
        ([np.zeros(16000), np.zeros(300)], r"Clip 1 has 300 samples"),
        (np.zeros((16000, 2), dtype=np.float32), r"looks like a single multichannel clip: pass it wrapped in a list"),
        (np.zeros((2, 300), dtype=np.float32), r"looks like a single multichannel clip"),
        (np.array([0.0] * 800 + [np.nan], dtype=np.float32), r"NaN or infinite samples \(clip indices \[0\]\)"),
        ([np.zeros(800), np.array([0.0] * 800 + [np.inf])], r"NaN or infinite samples \(clip indices \[1\]\)"),
        # the magnitude counts: a huge negative sample is refused as a huge positive one is
        (np.full(800, -2e3, dtype=np.float32), r"samples beyond \+-1000 \(clip indices \[0\]\)"),
        ([np.zeros(800), np.full(800, -2e3)], r"samples beyond \+-1000 \(clip indices \[1\]\)"),
        (np.zeros((1, 1, 2, 800), dtype=np.float32), r"1 \(one clip\), 2 .* or 3 .* dimensions, got shape \(1, 1, 2"),
        (np.array(0.5, dtype=np.float32), r"dimensions, got shape \(\)"),
        (torch.tensor(0.5), r"dimensions, got shape \(\)"),
        ([np.zeros((1, 2, 800))], r"clip 0 has shape \(1, 2, 800\)"),
        (np.zeros((16, 16000), dtype=np.float32)[None], "Could not tell the channel axis"),
        ([np.zeros((16, 16000))], "Could not tell the channel axis"),
        ("some_file.wav", "Expected audio as a numpy array, a torch tensor or a list"),
        (None, "Expected audio as a numpy array"),
        ({"array": np.zeros(16000), "sampling_rate": 16000}, "Expected audio as a numpy array"),
        (np.array(["a"] * 800), "must be numeric"),
        ([["a"] * 800], "must hold numbers"),
        (["a"] * 800, "got str"),
        (np.zeros(800, dtype=np.int64), "Unsupported sample type torch.int64"),
        (torch.zeros(800, dtype=torch.bool), "Unsupported sample type torch.bool"),
        (np.zeros(800, dtype=np.complex64), "Unsupported sample type"),
    ],
)
def test_bad_audio_raises(fe, audio, match):
    with pytest.raises(ValueError, match=match):
        fe(audio, sampling_rate=16000)


def test_too_short_after_resampling_says_so(fe):
    with pytest.raises(ValueError, match=r"Clip 0 has 1000 samples \(363 after resampling to 16000 Hz\)"):
        fe(np.zeros(1000, dtype=np.float32), sampling_rate=44100)


@pytest.mark.parametrize("sampling_rate", [0, -16000, 16000.5, "16000", True])
def test_bad_sampling_rate_raises(fe, sampling_rate):
    with pytest.raises(ValueError, match="`sampling_rate` must be a positive whole number of Hz"):
        fe(np.zeros(1000, dtype=np.float32), sampling_rate=sampling_rate)


def test_bad_return_tensors_raises(fe):
    with pytest.raises(ValueError, match="`return_tensors` must be 'pt', 'np' or None"):
        fe(np.zeros(1000, dtype=np.float32), sampling_rate=16000, return_tensors="mlx")


def test_missing_sampling_rate_warns(fe, caplog):
    with caplog.at_level(logging.WARNING):
        assumed = fe(np.zeros(1000, dtype=np.float32), return_tensors="np")
    assert "assumed to be sampled at 16000 Hz" in caplog.text
    assert assumed["input_values"].shape == (1, 80, 4)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fe(np.zeros(1000, dtype=np.float32), sampling_rate=16000)
    assert caplog.text == ""


def test_feature_extractor_from_a_model_config():
    from modeling_matpac import MatpacConfig

    config = MatpacConfig(f_max=7000.0, lms_mean=-6.0, lms_std=3.0, hop_length=320)
    extractor = MatpacFeatureExtractor.from_model_config(config)
    assert (extractor.f_max, extractor.mean, extractor.std, extractor.hop_length) == (7000.0, -6.0, 3.0, 320)
    torch.testing.assert_close(extractor.mel_filters, mel_filter_bank(201, 80, 16000, 50.0, 7000.0))


@pytest.mark.parametrize("orig_sr", [48000, 32000, 8000, 24000, 96000, 44100, 11025])
@pytest.mark.parametrize("num_samples", [4001, 16000])
def test_grouped_resampling_equals_the_plain_polyphase_filter(orig_sr, num_samples):
    """Stacking blocks of outputs into one convolution changes the speed, not the numbers."""
    from modeling_matpac.audio import _sinc_resample_kernel

    waveform = torch.randn(3, num_samples, generator=torch.Generator().manual_seed(orig_sr))
    divisor = math.gcd(orig_sr, 16000)
    orig, new = orig_sr // divisor, 16000 // divisor
    kernel, width = _sinc_resample_kernel(orig, new, waveform.device, waveform.dtype)
    padded = torch.nn.functional.pad(waveform[:, None], (width, width + orig))
    plain = torch.nn.functional.conv1d(padded, kernel, stride=orig).transpose(1, 2).reshape(3, -1)
    expected = plain[:, : -(-num_samples * new // orig)]
    resampled = resample(waveform, orig_sr, 16000)
    assert resampled.shape == expected.shape
    torch.testing.assert_close(resampled, expected, atol=1e-6, rtol=0)


def test_the_config_is_the_single_source_of_the_front_end():
    default, config = MatpacFeatureExtractor(), MatpacConfig()
    assert {argument: getattr(default, argument) for argument in FRONT_END_FIELDS.values()} == {
        argument: getattr(config, field) for field, argument in FRONT_END_FIELDS.items()
    }
    changed = MatpacConfig(num_mel_bins=128, hop_length=320, f_max=7000.0, lms_mean=-6.0)
    extractor = MatpacFeatureExtractor.from_model_config(changed)
    assert (extractor.feature_size, extractor.hop_length, extractor.f_max, extractor.mean) == (128, 320, 7000.0, -6.0)
    waveform = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    features = extractor(waveform, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert features.shape == (2, 128, 1 + (16000 - 400) // 320)
    assert torch.equal(features, extractor.normalized_log_mel(waveform))


# --- rates the resampler cannot follow -------------------------------------------------------------------------

UNRESAMPLABLE_SCRIPT = """
import json, sys
import numpy as np, soundfile as sf, torch
from modeling_matpac.audio import audio_duration, decode_mono_16k, decode_mono_16k_crop, read_mono, resample
from modeling_matpac.feature_extraction_matpac import MatpacFeatureExtractor
from modeling_matpac.pretraining import MatpacPretrainingDataset

def outcome(call):
    try:
        return repr(call())
    except ValueError as error:
        return f"{type(error).__name__}: {error}"

directory = sys.argv[1]
one_hz, one_ghz, good = (f"{directory}/{name}.wav" for name in ("1hz", "1ghz", "good"))
sf.write(one_hz, np.zeros(100, np.float32), 1)
sf.write(one_ghz, np.zeros(16000, np.float32), 10**9)
sf.write(good, 0.1 * np.random.default_rng(0).standard_normal(7 * 16000), 16000)
fe = MatpacFeatureExtractor()
results = {
    "fe 1 Hz": outcome(lambda: fe(np.zeros(4, np.float32), sampling_rate=1)),
    "fe 1 GHz": outcome(lambda: fe(np.zeros(16000, np.float32), sampling_rate=10**9)),
    "resample 2 Hz": outcome(lambda: resample(torch.zeros(100), 2, 16000)),
    "resample 3 Hz": outcome(lambda: resample(torch.zeros(100), 3, 16000).shape),
    "decode 1 Hz": outcome(lambda: decode_mono_16k(one_hz)),
    "crop 1 GHz": outcome(lambda: decode_mono_16k_crop(one_ghz, 400, np.random.default_rng(0))),
    "read 1 Hz": outcome(lambda: read_mono(one_hz)),
    "duration 1 Hz": outcome(lambda: audio_duration(one_hz)),
}
dataset = MatpacPretrainingDataset([one_hz, one_ghz, good], shuffle=False, infinite=False)
results["dataset"] = [(example["clip_id"][-8:], example["num_skipped_corrupt"]) for example in dataset]
print(json.dumps(results))
"""


def test_rates_the_resampler_cannot_follow_raise_instead_of_hanging(tmp_path):
    """Before: `_resampling_ratio` looped forever (1 Hz and 1 GHz to 16 kHz), so a file header froze a worker."""
    result = subprocess.run(
        [sys.executable, "-c", UNRESAMPLABLE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    cannot = "Cannot resample {} Hz audio to 16000 Hz: its exact filter would need {} values"
    assert results["fe 1 Hz"] == "ValueError: " + cannot.format(1, "16,000 x 137") + (
        ", and no rate ratio within 1 cent of pitch has one of at most 1,048,576."
    )
    assert results["fe 1 GHz"].startswith("ValueError: " + cannot.format(1000000000, "1 x 8,504,938"))
    # 2 Hz has filters that fit, but none closer than 4.5%: refused too; 3 Hz is read as 3.00019 Hz (1 : 5333)
    assert results["resample 2 Hz"].startswith("ValueError: " + cannot.format(2, "8,000 x 137"))
    assert results["resample 3 Hz"] == "torch.Size([533300])"
    # decoding raises `AudioDecodeError`, which the readers catch to skip and count the clip
    header = "AudioDecodeError: unusable sampling rate in its header: "
    assert results["decode 1 Hz"] == header + results["fe 1 Hz"].removeprefix("ValueError: ")
    assert results["crop 1 GHz"].startswith(header + cannot.format(1000000000, "1 x 8,504,938"))
    assert results["read 1 Hz"].startswith("AudioDecodeError: cannot decode " + str(tmp_path / "1hz.wav"))
    assert results["duration 1 Hz"] == "0.0"
    assert results["dataset"] == [["good.wav", 2]]


@pytest.mark.parametrize(
    "rate, ratio", [(16001, (1, 1)), (22050, (441, 320)), (44100, (441, 160)), (383999, (24, 1)), (3, (1, 5333))]
)
def test_rates_the_resampler_follows_resample_as_before(rate, ratio):
    """The exact ratio where its filter fits, else the closest fraction that fits (pinned): the same numbers."""
    from modeling_matpac.audio import _resampling_ratio, _sinc_resample_kernel

    assert _resampling_ratio(rate, 16000) == ratio
    waveform = torch.randn(2, max(rate, 4000), generator=torch.Generator().manual_seed(rate))
    orig, new = ratio
    kernel, width = _sinc_resample_kernel(orig, new, waveform.device, waveform.dtype)
    padded = torch.nn.functional.pad(waveform[:, None], (width, width + orig))
    plain = torch.nn.functional.conv1d(padded, kernel, stride=orig).transpose(1, 2).reshape(2, -1)
    expected = plain[:, : -(-waveform.shape[-1] * new // orig)]
    torch.testing.assert_close(resample(waveform, rate, 16000), expected, atol=1e-6, rtol=0)
    if rate > 1000:
        fe = MatpacFeatureExtractor()
        features = fe(waveform, sampling_rate=rate, return_tensors="pt")["input_values"]
        torch.testing.assert_close(features, fe.normalized_log_mel(expected), atol=1e-4, rtol=0)


# --- settings checked at construction --------------------------------------------------------------------------


BAD_SETTINGS = [
    ({"std": 0.0}, r"`std` must be positive"),
    ({"std": -4.0}, r"`std` must be positive"),
    ({"std": math.inf}, r"`std` must be a finite number, got inf"),
    ({"mean": math.nan}, r"`mean` must be a finite number, got nan"),
    ({"padding_value": None}, r"`padding_value` must be a finite number, got None"),
    ({"hop_length": 0}, r"`hop_length` must be positive, got 0"),
    ({"n_fft": 0}, r"`n_fft` must be positive, got 0"),
    ({"feature_size": 0}, r"`feature_size` must be positive, got 0"),
    ({"sampling_rate": -16000}, r"`sampling_rate` must be positive"),
    ({"n_fft": 400.5}, r"`n_fft` must be an integer, got 400.5"),
    ({"feature_size": True}, r"`feature_size` must be an integer, got True"),
    ({"sampling_rate": 8000}, r"f_max <= sampling_rate / 2, got f_min=50.0, f_max=8000.0, sampling_rate=8000"),
    ({"f_min": 9000.0}, r"0 <= f_min < f_max"),
    ({"f_min": -1.0}, r"0 <= f_min < f_max"),
    ({"hop_length": 401}, r"`hop_length` \(401\) must not exceed `n_fft` \(400\)"),
    ({"padding_side": "left"}, r"`padding_side` must be 'right', got 'left'"),
]


@pytest.mark.parametrize("settings, match", BAD_SETTINGS)
def test_bad_settings_raise_at_construction(settings, match):
    """Before: accepted, then NaN features (`std=0`), ignored (`padding_side`) or a torch error at the first call."""
    with pytest.raises(ValueError, match=match):
        MatpacFeatureExtractor(**settings)


@pytest.mark.parametrize("settings, match", BAD_SETTINGS)
def test_bad_settings_set_after_construction_are_refused_and_the_old_ones_kept(settings, match):
    """Before: accepted, then NaN features, a torch error at the first call, or (see below) silently ignored."""
    fe = MatpacFeatureExtractor()
    (name, value), before = next(iter(settings.items())), MatpacFeatureExtractor().to_dict()
    with pytest.raises(ValueError, match=match):
        setattr(fe, name, value)
    assert fe.to_dict() == before


def test_settings_changed_after_construction_act_as_given_to_the_constructor(ref):
    """Before: the mel filters and the window kept the settings of the construction (16 kHz filters, 400 samples)."""
    waveform = ref["mix_10s.wav"]
    for name, value in [("n_fft", 512), ("f_max", 7000.0), ("feature_size", 64)]:
        fe = MatpacFeatureExtractor()
        setattr(fe, name, value)
        expected = MatpacFeatureExtractor(**{name: value})(waveform, sampling_rate=16000, return_tensors="pt")
        assert torch.equal(
            fe(waveform, sampling_rate=16000, return_tensors="pt")["input_values"], expected["input_values"]
        )
        assert MatpacFeatureExtractor.from_dict(fe.to_dict()).window.shape == fe.window.shape


def test_a_saved_extractor_with_bad_settings_fails_to_load(tmp_path):
    MatpacFeatureExtractor().save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "std": 0.0}))
    with pytest.raises(ValueError, match="`std` must be positive"):
        MatpacFeatureExtractor.from_pretrained(tmp_path)


def test_valid_settings_at_8_khz_give_finite_features():
    fe = MatpacFeatureExtractor(sampling_rate=8000, f_max=4000.0, n_fft=200, hop_length=80, feature_size=64)
    waveform = 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(0))
    features = fe(waveform, sampling_rate=8000, return_tensors="pt")["input_values"]
    assert features.shape == (1, 64, 1 + (8000 - 200) // 80) and torch.isfinite(features).all()


# --- padding: featurize clip by clip, pad in the collator ------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_clips(ref) -> list[torch.Tensor]:
    """Three clips of different lengths (16,000, 9,000 and 4,000 samples: 98, 54 and 23 frames)."""
    waveform = ref["mix_10s.wav"]
    return [waveform[:16000], waveform[20000:29000], waveform[40000:44000]]


def test_pad_equals_featurizing_the_clips_together(uneven_clips):
    """Before: `pad` read the 80 mel bins as the length and could not stack clips of different lengths."""
    fe = MatpacFeatureExtractor(padding_value=-1.5)
    together = fe(uneven_clips, sampling_rate=16000, return_tensors="pt")
    assert together["attention_mask"].sum(dim=1).tolist() == [98, 54, 23]
    one_by_one = [fe(clip, sampling_rate=16000) for clip in uneven_clips]
    as_numpy = [{name: value[0] for name, value in features.items()} for features in one_by_one]
    as_torch = [{name: torch.from_numpy(value) for name, value in item.items()} for item in as_numpy]
    as_lists = [{name: value.tolist() for name, value in item.items()} for item in as_numpy]  # as `datasets` rows
    without_mask = [{"input_values": item["input_values"]} for item in as_numpy]
    for form, items in {"numpy": as_numpy, "torch": as_torch, "lists": as_lists, "no mask": without_mask}.items():
        padded = fe.pad(items, return_tensors="pt")
        assert padded["input_values"].dtype == torch.float32 and padded["attention_mask"].dtype == torch.int32, form
        assert torch.equal(padded["input_values"], together["input_values"]), form
        assert torch.equal(padded["attention_mask"], together["attention_mask"]), form
    assert torch.all(together["input_values"][2, :, 23:] == -1.5)
    as_np = fe.pad(as_numpy)  # numpy items give numpy arrays
    assert as_np["input_values"].dtype == np.float32 and as_np["attention_mask"].dtype == np.int32
    assert np.array_equal(as_np["input_values"], together["input_values"].numpy())
    assert list(fe.pad(as_numpy, return_attention_mask=False).keys()) == ["input_values"]


def test_pad_lengths_count_frames(uneven_clips):
    fe = MatpacFeatureExtractor()
    together = fe(uneven_clips, sampling_rate=16000, return_tensors="pt")
    items = [{name: value[0] for name, value in fe(clip, sampling_rate=16000).items()} for clip in uneven_clips]
    to_120 = fe.pad(items, padding="max_length", max_length=120, return_tensors="pt")
    assert to_120["input_values"].shape == (3, 80, 120)
    assert to_120["attention_mask"].sum(dim=1).tolist() == [98, 54, 23]
    assert torch.equal(to_120["input_values"][..., :98], together["input_values"])
    assert torch.all(to_120["input_values"][..., 98:] == 0.0)
    cut = fe.pad(items, max_length=40, truncation=True, return_tensors="pt")
    assert torch.equal(cut["input_values"], together["input_values"][..., :40])
    assert cut["attention_mask"].sum(dim=1).tolist() == [40, 40, 23]
    to_multiple = fe.pad(items, pad_to_multiple_of=16, return_tensors="pt")
    assert to_multiple["input_values"].shape == (3, 80, 112)
    assert torch.equal(to_multiple["input_values"][..., :98], together["input_values"])


def test_datasets_map_then_a_padding_collator_batches_clips(uneven_clips):
    """The transformers flow: featurize with `datasets.map`, batch with `DataCollatorWithPadding` in the Trainer."""
    import datasets
    from transformers import DataCollatorWithPadding

    fe = MatpacFeatureExtractor()
    rows = datasets.Dataset.from_dict({"audio": [clip.tolist() for clip in uneven_clips], "label": [2, 0, 1]})
    featurized = rows.map(
        lambda batch: fe(batch["audio"], sampling_rate=16000, padding=False),
        batched=True,
        remove_columns=["audio"],
    )
    assert [len(row["attention_mask"]) for row in featurized] == [98, 54, 23]  # each clip's own frames
    batch = DataCollatorWithPadding(fe)(list(featurized))
    together = fe(uneven_clips, sampling_rate=16000, return_tensors="pt")
    assert batch["labels"].tolist() == [2, 0, 1]
    assert torch.equal(batch["input_values"], together["input_values"])
    assert torch.equal(batch["attention_mask"], together["attention_mask"])


def test_call_padding_arguments(uneven_clips):
    """Before: `padding`, `max_length` and `truncation` raised a `TypeError` (unexpected keyword argument)."""
    fe = MatpacFeatureExtractor()
    default = fe(uneven_clips, sampling_rate=16000, return_tensors="pt")
    for padding in (True, "longest"):
        padded = fe(uneven_clips, sampling_rate=16000, return_tensors="pt", padding=padding)
        assert torch.equal(padded["input_values"], default["input_values"])
        assert torch.equal(padded["attention_mask"], default["attention_mask"])
    for padding in (False, "do_not_pad"):
        unpadded = fe(uneven_clips, sampling_rate=16000, padding=padding)
        for index, (clip, length) in enumerate(zip(uneven_clips, [98, 54, 23])):
            alone = fe(clip, sampling_rate=16000)
            assert unpadded["input_values"][index].shape == (80, length)
            assert np.array_equal(unpadded["input_values"][index], alone["input_values"][0])
            assert unpadded["attention_mask"][index].tolist() == [1] * length
    with pytest.raises(ValueError, match=r"`padding=False` leaves clips of 23 to 98 frames, which cannot be stacked"):
        fe(uneven_clips, sampling_rate=16000, padding=False, return_tensors="pt")
    same_length = fe([uneven_clips[1], uneven_clips[1]], sampling_rate=16000, padding=False, return_tensors="np")
    assert same_length["input_values"].shape == (2, 80, 54)
    refused = r"`padding='max_length'`, `max_length` and `truncation` are not supported: the model takes clips of any"
    for arguments in ({"padding": "max_length", "max_length": 100}, {"max_length": 100}, {"truncation": True}):
        with pytest.raises(ValueError, match=refused):
            fe(uneven_clips, sampling_rate=16000, **arguments)
    with pytest.raises(ValueError, match="not a valid PaddingStrategy"):
        fe(uneven_clips, sampling_rate=16000, padding="shortest")


def test_pad_refuses_what_is_not_featurized_clips(fe):
    with pytest.raises(ValueError, match=r"as \(feature_size=80, frames\), got shape \(16000,\) for clip 0"):
        fe.pad([{"input_values": np.zeros(16000, np.float32)}])
    with pytest.raises(ValueError, match=r"got shape \(64, 10\) for clip 1"):
        fe.pad([{"input_values": np.zeros((80, 10))}, {"input_values": np.zeros((64, 10))}])
    with pytest.raises(ValueError, match=r"`pad` needs featurized clips with `input_values`, got \['audio'\]"):
        fe.pad([{"audio": np.zeros(10)}])
