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
"""Audio input: the only place that decodes a file or bytes, mixes channels to mono and resamples.

Decoding uses `soundfile` (libsndfile: wav, flac, ogg, mp3; no FFmpeg, torchcodec or torchaudio). Resampling
reproduces `torchaudio.functional.resample` with the settings of the authors' pre-processing (Kaiser-windowed sinc,
torchaudio's "kaiser_best"), in plain torch, bitwise on the reference fixtures.

This file is copied next to saved checkpoints as remote code (the feature extractor resamples with it), so `soundfile`
is imported optionally: loading a model never needs it, decoding a file does.
"""

import io
import math
import numbers
import os
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from transformers.utils import logging


try:
    import soundfile as sf
except ImportError:  # only the decoding functions need it
    sf = None


logger = logging.get_logger(__name__)

SAMPLING_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

# Resampler settings of the authors' pre-processing script (torchaudio's "kaiser_best" preset).
RESAMPLING_LOWPASS_FILTER_WIDTH = 64
RESAMPLING_ROLLOFF = 0.9475937167399596
RESAMPLING_KAISER_BETA = 14.769656459379492
# Output phases below which blocks of outputs are stacked into one convolution (see `_grouped_resample_kernel`).
RESAMPLING_MIN_ROWS = 32
# Largest polyphase kernel, in values (4 MiB in float32): bounds the resampler's memory and time for any rate pair
# (see `_resampling_ratio`). Kernels are cached, at most `_KERNEL_CACHE_SIZE` of them.
RESAMPLING_MAX_KERNEL_VALUES = 2**20
_KERNEL_CACHE_SIZE = 8
# A close ratio is used only within one cent of pitch of the exact one; rate pairs with none are refused (to 16 kHz:
# 1 and 2 Hz, and rates far above any audio's, whose filter cannot fit even for a whole ratio).
RESAMPLING_MAX_RATE_ERROR = 2 ** (1 / 1200) - 1
# Floating point samples are nominally in [-1, 1]; beyond this magnitude (60 dB above full scale) a clip is taken as
# corrupt rather than loud: its log-mels would overflow float32 long before 1e18.
MAX_ABS_SAMPLE = 1e3
# The file subtypes that store float samples as they are, and the frames `check_all_samples` reads at a time.
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
_CHECK_BLOCK_FRAMES = 2**18


def _check_sampling_rate(sampling_rate: float, name: str = "sampling_rate") -> int:
    is_whole = isinstance(sampling_rate, (numbers.Integral, np.integer)) or (
        isinstance(sampling_rate, (float, np.floating)) and float(sampling_rate).is_integer()
    )
    if isinstance(sampling_rate, bool) or not is_whole or sampling_rate <= 0:
        raise ValueError(f"`{name}` must be a positive whole number of Hz, got {sampling_rate!r}.")
    return int(sampling_rate)


def _kernel_width(orig: int, new: int) -> int:
    """Input samples on each side of an output that its filter reads (torchaudio's `width`)."""
    return math.ceil(RESAMPLING_LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * RESAMPLING_ROLLOFF))


def _kernel_values(orig: int, new: int) -> int:
    return new * (2 * _kernel_width(orig, new) + orig)


@lru_cache(maxsize=64)
def _resampling_ratio(orig_sr: int, new_sr: int) -> tuple[int, int]:
    """
    The rate ratio `orig : new` the polyphase filter uses, a kernel of `new` rows of `2 * width + orig` values.

    It is the exact reduced ratio whenever that kernel holds at most `RESAMPLING_MAX_KERNEL_VALUES` values: every
    common rate (8, 11.025, 22.05, 24, 32, 44.1, 48, 88.2, 96, 176.4, 192, 352.8, 384 kHz...) resamples exactly as
    torchaudio does. Near-coprime rates (16,001 Hz would need a 16,000 x 16,137 kernel, 6 billion values at
    383,999 Hz) use instead the closest fraction whose kernel fits: the clip is then read as if sampled at
    `new_sr * orig / new` Hz, within 0.05% of its rate for every integer rate from 1 kHz to 384 kHz (at most 1 cent
    of pitch), and a warning says so.

    Raises:
        `ValueError`: no fraction whose kernel fits is within `RESAMPLING_MAX_RATE_ERROR` of the exact ratio (1 Hz
        to 16 kHz, or 1 GHz to 16 kHz, whose kernel does not fit even for the whole ratio 62,500 : 1).
    """
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    if _kernel_values(orig, new) <= RESAMPLING_MAX_KERNEL_VALUES:
        return orig, new
    exact = Fraction(orig, new)
    # new * (2 * width + new * ratio) values, with the width of the exact ratio: solve for the largest `new`.
    width, ratio = _kernel_width(orig, new), orig / new
    max_new = int((math.sqrt(width**2 + ratio * RESAMPLING_MAX_KERNEL_VALUES) - width) / ratio)
    for limit in range(max(max_new, 1), 0, -1):
        approximation = exact.limit_denominator(limit)
        if abs(approximation / exact - 1) > RESAMPLING_MAX_RATE_ERROR:
            break  # the closest fraction of a smaller denominator is no closer
        approx_orig, approx_new = approximation.numerator, approximation.denominator
        if _kernel_values(approx_orig, approx_new) <= RESAMPLING_MAX_KERNEL_VALUES:
            effective_sr = new_sr * approx_orig / approx_new
            logger.warning(
                f"Resampling {orig_sr} Hz to {new_sr} Hz exactly would need a {new:,} x {2 * width + orig:,} filter: "
                f"the audio is resampled as if sampled at {effective_sr:.6g} Hz "
                f"({100 * abs(effective_sr / orig_sr - 1):.2g}% off) instead."
            )
            return approx_orig, approx_new
    raise ValueError(
        f"Cannot resample {orig_sr} Hz audio to {new_sr} Hz: its exact filter would need {new:,} x "
        f"{2 * width + orig:,} values, and no rate ratio within 1 cent of pitch has one of at most "
        f"{RESAMPLING_MAX_KERNEL_VALUES:,}."
    )


def _resampled_length(n_samples: int, orig_sr: int, new_sr: int) -> int:
    """Samples of `n_samples` resampled from `orig_sr` to `new_sr` Hz, as `resample` returns them."""
    if orig_sr == new_sr:
        return n_samples
    orig, new = _resampling_ratio(orig_sr, new_sr)
    return -(-n_samples * new // orig)


def _sinc_resample_kernel(orig: int, new: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """
    Polyphase Kaiser-windowed sinc kernel `(new, 1, 2 * width + orig)` for the coprime rate ratio `orig : new`.

    Output phase `j` of every block of `new` outputs uses its own row; the float arithmetic follows torchaudio's
    `_get_sinc_resample_kernel` in the waveform's dtype, as the authors' resampling did.
    """
    # The kernel is cached, so it must not become an inference tensor that later autograd use would reject.
    with torch.inference_mode(False), torch.no_grad():
        cutoff = min(orig, new) * RESAMPLING_ROLLOFF
        zero_crossings = RESAMPLING_LOWPASS_FILTER_WIDTH
        width = _kernel_width(orig, new)
        input_offsets = torch.arange(-width, width + orig, dtype=dtype, device=device) / orig
        output_offsets = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None] / new
        time = ((output_offsets + input_offsets) * cutoff).clamp(-zero_crossings, zero_crossings)
        beta = torch.tensor(RESAMPLING_KAISER_BETA, dtype=dtype, device=device)
        kaiser = torch.i0(beta * torch.sqrt(1 - (time / zero_crossings) ** 2)) / torch.i0(beta)
        time = time * math.pi
        sinc = torch.where(time == 0, torch.ones((), dtype=dtype, device=device), time.sin() / time)
        kernel = sinc * (kaiser * (cutoff / orig))
    return kernel[:, None, :], width


@lru_cache(maxsize=_KERNEL_CACHE_SIZE)
def _grouped_resample_kernel(
    orig: int, new: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, int, int]:
    """
    The polyphase kernel with `group` consecutive blocks of outputs stacked as extra rows (each a copy shifted by
    `orig` samples), so that ratios with few output phases (48 kHz -> 16 kHz has one) still fill a matrix product
    instead of a matrix-vector one. The values, and so the outputs, are those of the plain kernel.
    """
    kernel, width = _sinc_resample_kernel(orig, new, device, dtype)
    group = -(-RESAMPLING_MIN_ROWS // new)
    if group > 1:
        with torch.inference_mode(False), torch.no_grad():
            shifted = [torch.nn.functional.pad(kernel, (orig * g, orig * (group - 1 - g))) for g in range(group)]
            kernel = torch.cat(shifted)
    return kernel, width, group


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """
    Resample `waveform` `(..., n_samples)` from `orig_sr` to `new_sr` Hz; the output has `ceil(n_samples * new_sr /
    orig_sr)` samples.

    Reproduces `torchaudio.functional.resample` with the authors' settings (Kaiser-windowed sinc, 64 zero crossings,
    rolloff 0.9476, beta 14.77): the rate ratio is reduced by its gcd and all rows are filtered by one strided
    `conv1d`. Zero padding on the right does not change the first `ceil(n * new_sr / orig_sr)` outputs (up to float
    rounding), so the clips of a zero-padded batch can be resampled together. Rate pairs whose exact filter would be
    huge use a close ratio instead, see `_resampling_ratio`: memory stays bounded for any pair, and a pair with no
    close ratio (1 Hz to 16 kHz) raises a `ValueError`.
    """
    orig_sr = _check_sampling_rate(orig_sr, "orig_sr")
    new_sr = _check_sampling_rate(new_sr, "new_sr")
    if orig_sr == new_sr:
        return waveform
    if not waveform.is_floating_point():
        raise TypeError(f"Expected a floating point waveform, got {waveform.dtype}.")
    orig, new = _resampling_ratio(orig_sr, new_sr)
    kernel, width, group = _grouped_resample_kernel(orig, new, waveform.device, waveform.dtype)
    *batch_shape, n_samples = waveform.shape
    num_outputs = -(-n_samples * new // orig)
    stride = orig * group
    num_steps = -(-num_outputs // (new * group))
    right = max((num_steps - 1) * stride + kernel.shape[-1] - n_samples - width, width + orig)
    padded = torch.nn.functional.pad(waveform.reshape(-1, 1, n_samples), (width, right))
    # (rows, group * new, steps) -> (rows, steps * group * new): output (s * group + g) * new + j is phase j of
    # block s * group + g
    phases = torch.nn.functional.conv1d(padded, kernel, stride=stride)
    resampled = phases.transpose(1, 2).reshape(*batch_shape, -1)
    return resampled[..., :num_outputs]


class AudioDecodeError(ValueError):
    """A clip that cannot be decoded into audio samples: empty, corrupt, in an unknown format or non-finite."""


def _open_sound_file(audio: bytes | str | os.PathLike) -> "sf.SoundFile":
    if sf is None:
        raise ImportError("Decoding audio files needs `soundfile`: pip install soundfile")
    if isinstance(audio, (bytes, bytearray, memoryview)):
        if len(audio) == 0:
            raise AudioDecodeError("the audio data is empty (0 bytes)")
        file = io.BytesIO(audio)
    elif isinstance(audio, (str, os.PathLike)):
        if os.path.isfile(audio) and os.path.getsize(audio) == 0:
            raise AudioDecodeError(f"{os.fspath(audio)} is empty (0 bytes)")
        file = os.fspath(audio)
    else:
        raise TypeError(f"Expected audio as bytes or a file path, got {type(audio).__name__}.")
    try:
        sound_file = sf.SoundFile(file)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioDecodeError(f"soundfile cannot open the audio: {error}") from error
    # Every clip is resampled to 16 kHz: a header rate that cannot be (1 Hz, 1 GHz) makes the file unusable, skipped
    # like a corrupt one rather than failing a whole run.
    try:
        _resampling_ratio(_check_sampling_rate(sound_file.samplerate, "samplerate"), SAMPLING_RATE)
    except ValueError as error:
        sound_file.close()
        raise AudioDecodeError(f"unusable sampling rate in its header: {error}") from error
    return sound_file


def _check_samples(samples: np.ndarray) -> None:
    """
    Refuse samples that are not audio: NaN, infinite, or beyond `MAX_ABS_SAMPLE` (a float file with samples of 1e18
    gives infinite log-mels, hence NaN weights). Raises `AudioDecodeError`.
    """
    peak = float(max(samples.max(), -samples.min())) if samples.size else 0.0
    if not math.isfinite(peak):
        raise AudioDecodeError("the audio has NaN or infinite samples")
    if peak > MAX_ABS_SAMPLE:
        raise AudioDecodeError(
            f"the audio has samples of magnitude {peak:.3g}, beyond {MAX_ABS_SAMPLE:g} (float audio is in [-1, 1])"
        )


def _read_samples(sound_file: "sf.SoundFile", frames: int = -1) -> np.ndarray:
    """The next `frames` samples (all by default) of an open file as float32 `(channels, samples)`."""
    try:
        samples = sound_file.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioDecodeError(f"soundfile cannot decode the audio: {error}") from error
    if samples.shape[0] == 0:
        raise AudioDecodeError("the audio has no samples")
    _check_samples(samples)
    return np.ascontiguousarray(samples.T)


def check_all_samples(audio: bytes | str | os.PathLike | dict) -> bool:
    """
    Reads a float file whole, a block at a time, and raises `AudioDecodeError` on NaN, infinite or absurdly large
    samples anywhere in it: a reader of crops would meet them in some epochs only. Only float files can hold such
    samples (integer PCM, FLAC included, and lossy codecs decode into [-1, 1]): any other file costs an open. Returns
    whether the file stores float samples, and so was read.
    """
    with _open_sound_file(_audio_payload(audio)) as sound_file:
        if sound_file.subtype not in _FLOAT_SUBTYPES:
            return False
        remaining = sound_file.frames
        while remaining > 0:
            remaining -= _read_samples(sound_file, min(remaining, _CHECK_BLOCK_FRAMES)).shape[-1]
    return True


def decode_audio(data: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """
    Decode an audio file (wav, flac, ogg, mp3, ... whatever libsndfile reads) from its bytes or its path.

    Returns:
        `(waveform, sampling_rate)`: float32 samples `(channels, samples)` in [-1, 1] and the file's rate in Hz.

    Raises:
        `AudioDecodeError`: the data is empty, corrupt, not audio, has no samples or has non-finite samples.
    """
    with _open_sound_file(data) as sound_file:
        return _read_samples(sound_file), sound_file.samplerate


def _length_at_16k(num_samples: int, sampling_rate: int) -> int:
    """Samples after resampling to 16 kHz, as `resample` returns them."""
    return _resampled_length(num_samples, sampling_rate, SAMPLING_RATE)


def to_mono_16k(waveform: np.ndarray | torch.Tensor, sampling_rate: int) -> torch.Tensor:
    """Average the channels of `waveform` `(channels, samples)` (or mono `(samples,)`) and resample it to 16 kHz."""
    waveform = torch.as_tensor(waveform, dtype=torch.float32)
    if waveform.ndim == 2:
        waveform = waveform.mean(dim=0)
    elif waveform.ndim != 1:
        raise ValueError(f"Expected a waveform (channels, samples) or (samples,), got shape {tuple(waveform.shape)}.")
    return resample(waveform, sampling_rate, SAMPLING_RATE).contiguous()


def decode_mono_16k(audio: bytes | str | os.PathLike | dict, min_samples: int = 0) -> torch.Tensor | None:
    """
    Decode a clip, average it to mono and resample it to 16 kHz: float32 `(samples,)`, or `None` if it has fewer than
    `min_samples` samples at 16 kHz. The file header tells the length first, so that short clips are not decoded.

    `audio` is the file's bytes, its path, or a `datasets` audio value `{"bytes", "path"}`.

    Raises:
        `AudioDecodeError`: the clip is empty, corrupt, not audio, has no samples or has non-finite samples.
    """
    with _open_sound_file(_audio_payload(audio)) as sound_file:
        if _length_at_16k(sound_file.frames, sound_file.samplerate) < min_samples:
            return None
        waveform, sampling_rate = _read_samples(sound_file), sound_file.samplerate
    waveform = to_mono_16k(waveform, sampling_rate)
    if waveform.shape[-1] < min_samples:  # the header over-stated the length
        return None
    return waveform


def decode_mono_16k_windows(
    audio: bytes | str | os.PathLike | dict, step: int, overlap: int, min_samples: int = 0, whole_below: int = 0
) -> Iterator[torch.Tensor] | None:
    """
    The clip mono at 16 kHz as consecutive windows, samples `[k * step, k * step + step + overlap)` for k = 0, 1, ...
    while `k * step + overlap` is below its length (the last ones cut at its end); `None` if it has fewer than
    `min_samples` samples at 16 kHz. A clip of `whole_below` samples or more, in a file that can seek and is not cut
    short, is read window by window, so that its memory does not grow with its length, each window equal to the same
    samples of `decode_mono_16k(audio)` up to float rounding; any other clip is decoded whole and sliced.

    Raises:
        `AudioDecodeError`: as `decode_mono_16k`, when the clip is opened or while its windows are read.
    """
    with _open_sound_file(_audio_payload(audio)) as sound_file:
        length = _length_at_16k(sound_file.frames, sound_file.samplerate)
        if length < min_samples:
            return None
        windowed = length >= whole_below and _reads_to_its_end(sound_file)
    if not windowed:
        waveform = decode_mono_16k(audio, min_samples)
        if waveform is None:
            return None
        return (waveform[first : first + step + overlap] for first in range(0, len(waveform) - overlap, step))

    def windows() -> Iterator[torch.Tensor]:
        with _open_sound_file(_audio_payload(audio)) as sound_file:
            for first in range(0, length - overlap, step):
                yield _read_mono_16k_window(sound_file, first, min(step + overlap, length - first))

    return windows()


_warned_unseekable: set[str] = set()


def decode_mono_16k_crop(
    audio: bytes | str | os.PathLike | dict, num_samples: int, rng: np.random.Generator
) -> torch.Tensor | None:
    """
    A random crop of `num_samples` samples of a clip, mono at 16 kHz: samples `[start, start + num_samples)` of
    `decode_mono_16k(audio)`, with `start = rng.integers(length - num_samples + 1)` and `length` the clip's length at
    16 kHz; `None` (and no draw) when the clip is shorter.

    Only the frames the crop needs are read (plus the resampling filter's reach on each side), so the memory and time
    of a crop do not grow with the clip: an hour-long file costs what a 6 s one does. The crop equals the same samples
    of the whole resampled clip up to float rounding. A file that cannot seek is decoded whole, with a warning once per
    format, and so is a file cut short (its last frame by the header does not decode): its length is then what it
    holds, in every epoch.

    Raises:
        `AudioDecodeError`: the clip is empty, corrupt, not audio, damaged where the crop reads it, or has non-finite
        or absurdly large samples.
    """
    with _open_sound_file(_audio_payload(audio)) as sound_file:
        length = _length_at_16k(sound_file.frames, sound_file.samplerate)
        if length < num_samples:
            return None
        if _reads_to_its_end(sound_file):
            start = int(rng.integers(length - num_samples + 1))
            return _read_mono_16k_window(sound_file, start, num_samples)
        if not sound_file.seekable() and sound_file.format not in _warned_unseekable:
            _warned_unseekable.add(sound_file.format)
            logger.warning(
                f"{sound_file.format} audio cannot seek here: each crop decodes its whole file (slow for long "
                "files; convert them to FLAC or WAV, or pre-compute log-mels with `preprocess_to_cache`)."
            )
    waveform = decode_mono_16k(audio, num_samples)
    if waveform is None:
        return None
    start = int(rng.integers(waveform.shape[-1] - num_samples + 1))
    return waveform[start : start + num_samples].contiguous()


def _reads_to_its_end(sound_file: "sf.SoundFile") -> bool:
    """
    Whether the file can seek and its last frame, as its header counts them, decodes; then it is read at the start
    again. A file cut short (an interrupted download) fails this: it is decoded whole instead, as the audio it holds,
    so that every reader (a crop of any epoch, the log-mel cache) takes the same samples from it.
    """
    if not sound_file.seekable():
        return False
    try:
        sound_file.seek(sound_file.frames - 1)
        complete = len(sound_file.read(1, dtype="float32")) == 1
        sound_file.seek(0)
    except (sf.LibsndfileError, RuntimeError):
        return False
    return complete


def _read_mono_16k_window(sound_file: "sf.SoundFile", start: int, num_samples: int) -> torch.Tensor:
    """
    Samples `[start, start + num_samples)` of the file resampled to 16 kHz, reading only the input frames that the
    polyphase filter's convolution steps for those outputs cover: the steps, and so the numbers, of `resample`.
    """
    sampling_rate, frames = sound_file.samplerate, sound_file.frames

    def read(first: int, stop: int) -> torch.Tensor:
        """Mono input samples `[first, stop)`, zeros outside the file (the padding of `resample`)."""
        begin, end = max(first, 0), min(stop, frames)
        samples = torch.zeros(max(stop - first, 0), dtype=torch.float32)
        if end > begin:
            try:
                sound_file.seek(begin)
            except (sf.LibsndfileError, RuntimeError) as error:  # a damaged stretch of the file
                raise AudioDecodeError(f"soundfile cannot seek in the audio: {error}") from error
            window = _read_samples(sound_file, end - begin)
            if window.shape[-1] != end - begin:
                raise AudioDecodeError(f"the audio has fewer samples than its header's {frames}")
            samples[begin - first : end - first] = torch.from_numpy(window).mean(dim=0)
        return samples

    if sampling_rate == SAMPLING_RATE:
        return read(start, start + num_samples)
    orig, new = _resampling_ratio(sampling_rate, SAMPLING_RATE)
    kernel, width, group = _grouped_resample_kernel(orig, new, torch.device("cpu"), torch.float32)
    outputs_per_step, stride = new * group, orig * group
    first_step, stop_step = start // outputs_per_step, -(-(start + num_samples) // outputs_per_step)
    first = first_step * stride - width
    samples = read(first, (stop_step - 1) * stride - width + kernel.shape[-1])
    phases = torch.nn.functional.conv1d(samples[None, None], kernel, stride=stride)
    resampled = phases.transpose(1, 2).reshape(-1)
    offset = start - first_step * outputs_per_step
    return resampled[offset : offset + num_samples].contiguous()


def read_mono(source: bytes | str | os.PathLike, name: str | None = None) -> tuple[np.ndarray, int]:
    """
    Decode a clip at its own rate and average its channels: float32 `(samples,)` and the rate in Hz.

    Raises:
        `AudioDecodeError`: naming the clip (`name`, else the path) when it cannot be decoded.
    """
    try:
        waveform, sampling_rate = decode_audio(source)
    except AudioDecodeError as error:
        label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "audio bytes")
        raise AudioDecodeError(f"cannot decode {label}: {error}") from error
    return waveform.mean(axis=0), sampling_rate


def audio_duration(source: bytes | str | os.PathLike) -> float:
    """Seconds, from the header; 0 when unreadable (decoding the clip then raises `AudioDecodeError`)."""
    try:
        with _open_sound_file(source) as sound_file:
            return sound_file.frames / sound_file.samplerate
    except (AudioDecodeError, OSError):
        return 0.0


def _audio_payload(value: object) -> bytes | str | os.PathLike:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
        raise AudioDecodeError("the row has neither audio bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike)):
        return value
    raise TypeError(
        f"Expected audio as bytes, a path or a {{'bytes', 'path'}} dict, got {type(value).__name__}: point "
        "`audio_column` at a column of undecoded audio files."
    )


__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioDecodeError",
    "MAX_ABS_SAMPLE",
    "decode_audio",
    "audio_duration",
    "decode_mono_16k",
    "decode_mono_16k_crop",
    "read_mono",
    "resample",
    "to_mono_16k",
]
