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
"""The built-in pre-training corpus: synthetic clips with time-frequency structure, so a run needs no download."""

import io
import os
import wave
from pathlib import Path

import numpy as np


def _synthesize(kind: str, rng: np.random.Generator, sampling_rate: int, num_samples: int) -> np.ndarray:
    """One mono float64 signal of a kind with its own time-frequency structure, so that patches are predictable."""
    nyquist_margin = 0.45 * sampling_rate
    signal = np.zeros(num_samples)
    start = 0
    while start < num_samples:
        length = int(rng.uniform(0.2, 1.2) * sampling_rate)
        if num_samples - start - length < 0.2 * sampling_rate:  # the last segment takes the rest
            length = num_samples - start
        time = np.arange(length) / sampling_rate
        if kind == "harmonic":  # a note with harmonics and an attack-decay envelope
            f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
            rolloff = rng.uniform(0.5, 2.0)
            note = sum(
                h**-rolloff * np.sin(2 * np.pi * h * f0 * time + rng.uniform(0, 2 * np.pi))
                for h in range(1, int(rng.integers(1, 9)) + 1)
                if h * f0 < nyquist_margin
            )
            segment = note * (1 - np.exp(-time / 0.01)) * np.exp(-time / rng.uniform(0.1, 0.8))
        elif kind == "chirp":  # an exponential sweep
            low, high = np.exp(rng.uniform(np.log(100), np.log(min(6000, nyquist_margin)), size=2))
            frequency = low * (high / low) ** (time / time[-1])
            segment = np.sin(2 * np.pi * np.cumsum(frequency) / sampling_rate) * np.hanning(length)
        elif kind == "noise_bursts":  # band-pass noise bursts between silences
            spectrum = np.fft.rfft(rng.standard_normal(length))
            frequencies = np.fft.rfftfreq(length, 1 / sampling_rate)
            centre = np.exp(rng.uniform(np.log(200), np.log(min(6000, nyquist_margin))))
            band = np.exp(-0.5 * (np.log(np.maximum(frequencies, 1.0) / centre) / rng.uniform(0.1, 0.5)) ** 2)
            segment = np.fft.irfft(spectrum * band, length) * np.hanning(length)
            segment[int(length * rng.uniform(0.3, 0.9)) :] = 0.0
        else:  # "am_tone": an amplitude-modulated tone with vibrato
            carrier = rng.uniform(200, 3000)
            vibrato = carrier * 0.01 * np.sin(2 * np.pi * rng.uniform(3, 7) * time)
            depth, rate = rng.uniform(0.3, 1.0), rng.uniform(2, 16)
            segment = (1 + depth * np.sin(2 * np.pi * rate * time)) * np.sin(
                2 * np.pi * np.cumsum(carrier + vibrato) / sampling_rate
            )
        signal[start : start + length] = segment / max(np.abs(segment).max(), 1e-9)
        start += length
    return signal


def generate_builtin_corpus(output_dir: str | os.PathLike, num_clips: int = 32, seed: int = 0) -> list[Path]:
    """
    Write a small synthetic corpus of 6.5-8 s wav clips (16, 22.05 and 44.1 kHz, mono and stereo: harmonic notes,
    chirps, noise bursts and AM tones) for a pre-training run without any download.

    The files are bitwise identical for the same `num_clips` and `seed`: they are built with numpy, quantised to 16-bit
    PCM and written with the standard library's `wave`. About 0.55 MB per clip.

    Returns:
        The paths of the clips, sorted (train on these rather than on the folder, which may hold older files).
    """
    if num_clips < 1:
        raise ValueError(f"`num_clips` must be positive, got {num_clips}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    kinds = ("harmonic", "chirp", "noise_bursts", "am_tone")
    sampling_rates = (16000, 22050, 44100)
    paths = []
    for index in range(num_clips):
        rng = np.random.default_rng([seed, index])
        # Periods 4, 3 and 5: every combination of kind, rate and channels occurs among 60 clips.
        kind, sampling_rate = kinds[index % 4], sampling_rates[index % 3]
        num_channels = 2 if index % 5 in (1, 3) else 1
        num_samples = int(rng.uniform(6.5, 8.0) * sampling_rate)
        signal = _synthesize(kind, rng, sampling_rate, num_samples)
        channels = [signal]
        if num_channels == 2:
            delay = int(rng.integers(1, 32))
            channels.append(rng.uniform(0.6, 1.0) * np.concatenate([np.zeros(delay), signal[:-delay]]))
        audio = np.stack(channels, axis=1) + 0.002 * rng.standard_normal((num_samples, num_channels))
        audio *= rng.uniform(0.3, 0.9) / np.abs(audio).max()
        pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")
        path = output_dir / f"{index:03d}_{kind}.wav"
        encoded = io.BytesIO()
        with wave.open(encoded, "wb") as wav_file:
            wav_file.setnchannels(num_channels)
            wav_file.setsampwidth(2)
            wav_file.setframerate(sampling_rate)
            wav_file.writeframes(pcm.tobytes())
        # A file already as it should be is left alone: a run that reads it (or a stopped log-mel cache build, which
        # knows its files by size and time) sees the same file.
        if not path.is_file() or path.read_bytes() != encoded.getvalue():
            path.write_bytes(encoded.getvalue())
        paths.append(path)
    return sorted(paths)


__all__ = ["generate_builtin_corpus"]
