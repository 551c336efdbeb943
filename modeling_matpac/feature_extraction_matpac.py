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
"""Waveform -> normalised log-mel spectrogram, the MATPAC front end.

The authors computed their log-mels with torchaudio's `MelSpectrogram` and resampled with torchaudio's Kaiser-windowed
sinc resampler. torchaudio no longer imports on recent or CPU-only torch builds, so both are re-implemented here with
plain torch, following torchaudio's float32 arithmetic step by step: the outputs match the authors' front end bitwise
on the reference fixtures.

This file is copied next to saved checkpoints as remote code, so it imports nothing but torch, numpy and transformers.
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import fields

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import PaddingStrategy, TensorType, logging

from .audio import MAX_ABS_SAMPLE, _check_sampling_rate, _resampled_length, resample
from .configuration_matpac import FIELD_RULES, FRONT_END_FIELDS, MatpacConfig, check_front_end_ranges


logger = logging.get_logger(__name__)

# The feature extractor's defaults: those of the config's front-end fields.
_DEFAULTS = {FRONT_END_FIELDS[f.name]: f.default for f in fields(MatpacConfig) if f.name in FRONT_END_FIELDS}
# A 2-D clip is multichannel along its axis of at most this size (channels-first or channels-last).
MAX_CHANNELS = 8
# The settings checked at construction (and at any change after it): whole numbers, and finite numbers.
_INTEGER_SETTINGS = ("feature_size", "sampling_rate", "n_fft", "hop_length")
_REAL_SETTINGS = ("padding_value", "f_min", "f_max", "log_offset", "mean", "std")
_CHECKED_SETTINGS = frozenset((*_INTEGER_SETTINGS, *_REAL_SETTINGS, "padding_side"))

# Integer PCM sample formats -> (offset, scale) mapping them to floats in [-1, 1).
_PCM_OFFSET_AND_SCALE = {
    torch.int8: (0.0, 128.0),
    torch.uint8: (128.0, 128.0),
    torch.int16: (0.0, 32768.0),
    torch.int32: (0.0, 2.0**31),
}

# Slaney mel scale: linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_slaney_mel(frequency: float) -> float:
    if frequency < _SLANEY_LOG_START_HZ:
        return frequency / _SLANEY_HZ_PER_MEL
    return _SLANEY_LOG_START_MEL + math.log(frequency / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP


def _slaney_mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    linear = mels * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * torch.exp(_SLANEY_LOG_STEP * (mels - _SLANEY_LOG_START_MEL))
    return torch.where(mels >= _SLANEY_LOG_START_MEL, logarithmic, linear)


def mel_filter_bank(
    n_freqs: int = 201,
    n_mels: int = 80,
    sampling_rate: int = 16000,
    f_min: float = 50.0,
    f_max: float = 8000.0,
) -> torch.Tensor:
    """
    Triangular mel filters on the Slaney scale with Slaney area normalisation, shape `(n_freqs, n_mels)`.

    Built in float32 in the same order of operations as torchaudio's `melscale_fbanks(norm="slaney",
    mel_scale="slaney")`, so it equals the authors' filter bank bitwise. A float64 construction differs by ~1e-7, which
    moves log-mels of near-silent bands by up to 1e-3.
    """
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"Expected 0 <= f_min < f_max, got f_min={f_min} and f_max={f_max}.")
    fft_frequencies = torch.linspace(0, sampling_rate // 2, n_freqs, dtype=torch.float32)
    mel_points = torch.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2, dtype=torch.float32)
    band_edges = _slaney_mel_to_hz(mel_points)
    band_widths = band_edges.diff()
    # distances[i, j]: how far band edge j lies above FFT bin i, in Hz
    distances = band_edges[None, :] - fft_frequencies[:, None]
    rising = -distances[:, :-2] / band_widths[:-1]
    falling = distances[:, 2:] / band_widths[1:]
    filters = torch.minimum(rising, falling).clamp(min=0.0)
    return filters * (2.0 / (band_edges[2:] - band_edges[:-2]))


# A longer recording is transformed this many frames (5.5 minutes at 16 kHz) at a time: its spectra take about 15 times
# the memory of its log-mel (an hour of audio peaked 1.71 GB above the audio in one piece, 0.31 GB in blocks). Frames
# are independent, so the blocks give the same values.
FRAMES_PER_BLOCK = 2**15


def log_mel_spectrogram(
    waveform: torch.Tensor,
    mel_filters: torch.Tensor,
    window: torch.Tensor,
    hop_length: int = 160,
    log_offset: float = torch.finfo(torch.float32).eps,
) -> torch.Tensor:
    """
    Natural-log mel power spectrogram of `waveform` `(..., n_samples)`, shape `(..., n_mels, n_frames)`.

    Frames are not centred (the first starts at sample 0), so `n_frames = 1 + (n_samples - n_fft) // hop_length` with
    `n_fft = len(window)`. Each row is independent, and everything runs on the waveform's device.
    """
    n_fft = window.shape[-1]
    if waveform.shape[-1] < n_fft:
        raise ValueError(f"The waveform has {waveform.shape[-1]} samples, fewer than one window of {n_fft}.")
    n_frames = 1 + (waveform.shape[-1] - n_fft) // hop_length
    if n_frames > FRAMES_PER_BLOCK:
        blocks = []
        for first in range(0, n_frames, FRAMES_PER_BLOCK):
            count = min(FRAMES_PER_BLOCK, n_frames - first)
            block = waveform[..., first * hop_length : first * hop_length + n_fft + (count - 1) * hop_length]
            blocks.append(log_mel_spectrogram(block, mel_filters, window, hop_length, log_offset))
        return torch.cat(blocks, dim=-1)
    # Features are float32 inside an autocast region too (a whole inference step is often wrapped in one).
    with torch.autocast(waveform.device.type, enabled=False):
        frames = waveform.unfold(-1, n_fft, hop_length) * window.to(waveform)
        power_spectrum = torch.fft.rfft(frames, dim=-1).abs().pow(2)
        mel_spectrum = mel_filters.to(waveform).mT @ power_spectrum.mT
        return torch.log(mel_spectrum + log_offset)


def _is_sample(value) -> bool:
    return isinstance(value, (numbers.Number, np.generic)) or (
        isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0
    )


def _as_tensor(audio) -> torch.Tensor:
    """Any supported array-like as a tensor, keeping integer PCM dtypes so that they can be rescaled."""
    if isinstance(audio, torch.Tensor):
        return audio.detach()
    if isinstance(audio, np.ndarray):
        if not np.issubdtype(audio.dtype, np.number):
            raise ValueError(f"Audio samples must be numeric, got a numpy array of dtype {audio.dtype}.")
        return torch.from_numpy(np.require(audio, dtype=audio.dtype.newbyteorder("="), requirements="C"))
    if isinstance(audio, (list, tuple)):
        try:
            return torch.from_numpy(np.asarray(audio, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise ValueError(
                "Audio given as a list must hold numbers (or, for a multichannel clip, equally long lists of "
                f"numbers): {error}"
            ) from error
    raise ValueError(
        f"Expected audio as a numpy array, a torch tensor or a list of samples or clips, got {type(audio).__name__}."
    )


def _to_float32(audio: torch.Tensor) -> torch.Tensor:
    if audio.is_floating_point():
        return audio.to(torch.float32)
    if audio.dtype not in _PCM_OFFSET_AND_SCALE:
        raise ValueError(
            f"Unsupported sample type {audio.dtype}: expected floating point samples in [-1, 1] or int8, uint8, "
            "int16 or int32 PCM."
        )
    offset, scale = _PCM_OFFSET_AND_SCALE[audio.dtype]
    return (audio.to(torch.float32) - offset) / scale


def _channel_dim(shape: tuple[int, int]) -> int:
    """Which of two axes holds channels: the one of size <= MAX_CHANNELS (the smaller one if both do)."""
    if min(shape) > MAX_CHANNELS:
        raise ValueError(
            f"Could not tell the channel axis of a multichannel clip of shape {tuple(shape)}: expected one axis of "
            f"at most {MAX_CHANNELS} channels, (channels, samples) or (samples, channels)."
        )
    return 0 if shape[0] <= shape[1] else 1


class MatpacFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Constructs a MATPAC feature extractor: mono 16 kHz audio -> normalised log-mel spectrogram `(80, n_frames)`.

    Audio at another rate is resampled like the authors' pre-processing, multichannel audio is averaged to mono. The
    log-mel is the authors' (25 ms periodic Hann window, 10 ms hop, no centring, 80 Slaney mel bands from 50 Hz to
    8 kHz, `log(mel + eps)`), normalised with the pre-training set statistics. Clips of a batch are zero padded; frames
    past a clip's end are set to `padding_value` (0, the dataset mean after normalisation) and masked out by
    `attention_mask`.

    Args:
        feature_size (`int`, *optional*, defaults to 80):
            Number of mel bands.
        sampling_rate (`int`, *optional*, defaults to 16000):
            Sampling rate the model expects, in Hz.
        padding_value (`float`, *optional*, defaults to 0.0):
            Value of the normalised log-mel frames past the end of a shorter clip of a batch.
        n_fft (`int`, *optional*, defaults to 400):
            Window and FFT length in samples.
        hop_length (`int`, *optional*, defaults to 160):
            Hop between frames in samples.
        f_min (`float`, *optional*, defaults to 50.0):
            Lowest mel band edge in Hz.
        f_max (`float`, *optional*, defaults to 8000.0):
            Highest mel band edge in Hz.
        log_offset (`float`, *optional*, defaults to 1.1920928955078125e-07):
            Added to the mel power before the log (float32 machine epsilon, as the authors).
        mean (`float`, *optional*, defaults to -7.056):
            Log-mel mean of the pre-training set.
        std (`float`, *optional*, defaults to 4.193):
            Log-mel standard deviation of the pre-training set.
        return_attention_mask (`bool`, *optional*, defaults to `True`):
            Whether `__call__` returns the frame-level `attention_mask` by default.
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = _DEFAULTS["feature_size"],
        sampling_rate: int = _DEFAULTS["sampling_rate"],
        padding_value: float = 0.0,
        n_fft: int = _DEFAULTS["n_fft"],
        hop_length: int = _DEFAULTS["hop_length"],
        f_min: float = _DEFAULTS["f_min"],
        f_max: float = _DEFAULTS["f_max"],
        log_offset: float = _DEFAULTS["log_offset"],
        mean: float = _DEFAULTS["mean"],
        std: float = _DEFAULTS["std"],
        return_attention_mask: bool = True,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.f_min = f_min
        self.f_max = f_max
        self.log_offset = log_offset
        self.mean = mean
        self.std = std
        self._check_settings()
        self._build_filters()

    def _build_filters(self) -> None:
        # `to_dict` leaves out exactly these two tensor attributes; they are rebuilt from the settings.
        self.mel_filters = mel_filter_bank(
            self.n_fft // 2 + 1, self.feature_size, self.sampling_rate, self.f_min, self.f_max
        )
        self.window = torch.hann_window(self.n_fft)

    def __setattr__(self, name: str, value) -> None:
        """
        A setting changed after construction is checked, and acts as if given to the constructor (the filters and
        window follow it, as they would after saving and loading); a bad value is refused and the old one kept.
        """
        constructed = "window" in self.__dict__
        previous = self.__dict__.get(name)
        super().__setattr__(name, value)
        if constructed and name in _CHECKED_SETTINGS:
            try:
                self._check_settings()
            except ValueError:
                super().__setattr__(name, previous)
                raise
            self._build_filters()

    def _check_settings(self) -> None:
        """
        The rules `MatpacConfig` sets on the front-end fields, and finite numbers: a bad setting fails here, not as NaN
        features (`std=0`) or a torch error at the first call (`hop_length=0`).
        """
        for name in _INTEGER_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        for name in _REAL_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        for field, name in FRONT_END_FIELDS.items():
            if field in FIELD_RULES and not FIELD_RULES[field][0](getattr(self, name)):
                raise ValueError(f"`{name}` must be {FIELD_RULES[field][1]}, got {getattr(self, name)}.")
        check_front_end_ranges(self.sampling_rate, self.n_fft, self.hop_length, self.f_min, self.f_max)
        if self.padding_side != "right":
            raise ValueError(
                f"`padding_side` must be 'right', got {self.padding_side!r}: the model takes padding at the end of a "
                "clip, so that a clip gets the same embeddings alone or in a batch."
            )

    @classmethod
    def from_model_config(cls, config) -> "MatpacFeatureExtractor":
        """The front end a model was configured with (the front-end fields of a `MatpacConfig`)."""
        return cls(**{argument: getattr(config, field) for field, argument in FRONT_END_FIELDS.items()})

    def num_samples(self, num_frames: int) -> int:
        """Samples at `self.sampling_rate` that give exactly `num_frames` frames."""
        return self.n_fft + (num_frames - 1) * self.hop_length

    def normalized_log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """
        The model input of mono `waveform` `(..., n_samples)` already at `self.sampling_rate`: its log-mel `(...,
        feature_size, n_frames)` normalised with the pre-training statistics. The only place that computes it: the
        pre-training crops and the log-mel cache call it too.
        """
        log_mel = log_mel_spectrogram(waveform, self.mel_filters, self.window, self.hop_length, self.log_offset)
        return (log_mel - self.mean) / self.std

    def __call__(
        self,
        raw_audio: np.ndarray | torch.Tensor | list | tuple,
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        return_attention_mask: bool | None = None,
        device: str | torch.device | None = None,
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        truncation: bool = False,
    ) -> BatchFeature:
        """
        Featurize one clip or a batch of clips.

        Args:
            raw_audio (`np.ndarray`, `torch.Tensor`, `list` or `tuple`):
                - a 1-D array (or a list of numbers): one mono clip;
                - a 2-D array: a batch of mono clips `(batch, samples)`, as elsewhere in transformers (pass a single
                  multichannel clip wrapped in a list);
                - a 3-D array: a batch of multichannel clips, `(batch, channels, samples)` or `(batch, samples,
                  channels)`;
                - a list or tuple of clips, each 1-D (mono) or 2-D (multichannel, channels-first or channels-last),
                  of any lengths.
                The channel axis is the one of at most 8 entries; channels are averaged. Floating point samples are
                taken as is (NaN, infinite or beyond +-1000 are refused), int8/uint8/int16/int32 PCM is scaled to
                [-1, 1).
            sampling_rate (`int`, *optional*):
                Sampling rate of `raw_audio` in Hz; other rates than `self.sampling_rate` are resampled. Assumed to be
                `self.sampling_rate` (with a warning) when not given.
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for torch tensors, `"np"` for numpy arrays, `None` for lists of numpy arrays (one per clip).
            return_attention_mask (`bool`, *optional*):
                Whether to return the `(batch, n_frames)` int32 frame mask; defaults to `self.return_attention_mask`.
            device (`str` or `torch.device`, *optional*):
                Device to compute on (and to return `"pt"` tensors on). Defaults to the device of torch input, else
                the CPU.
            padding (`bool`, `str` or [`~utils.PaddingStrategy`], *optional*, defaults to `True`):
                `True` or `"longest"`: the clips of a batch are padded to the longest. `False` or `"do_not_pad"`: each
                clip keeps its own frames, for `return_tensors=None` (to featurize clips with `datasets.map` and pad
                them in the collator, see `pad`). `"max_length"`, `max_length` and `truncation` are refused: the model
                takes clips of any length; crop the audio, or pad and cut frames with `pad`.

        Returns:
            [`BatchFeature`] with `input_values` `(batch, feature_size, n_frames)` float32, `n_frames` being the
            largest `1 + (n_samples - n_fft) // hop_length` of the batch after resampling, and `attention_mask`.
        """
        if sampling_rate is None:
            logger.warning(
                f"No `sampling_rate` was passed to {self.__class__.__name__}: the audio is assumed to be sampled at "
                f"{self.sampling_rate} Hz. Pass `sampling_rate` so that other rates are resampled instead of "
                "silently giving wrong features."
            )
            sampling_rate = self.sampling_rate
        sampling_rate = _check_sampling_rate(sampling_rate)
        if isinstance(padding, bool):
            padding = PaddingStrategy.LONGEST if padding else PaddingStrategy.DO_NOT_PAD
        padding = PaddingStrategy(padding)
        if padding == PaddingStrategy.MAX_LENGTH or max_length is not None or truncation:
            raise ValueError(
                "`padding='max_length'`, `max_length` and `truncation` are not supported: the model takes clips of "
                "any length; crop the audio, or pad and cut frames with `feature_extractor.pad(..., max_length=...)`."
            )
        if return_tensors is not None:
            return_tensors = TensorType(return_tensors)
            if return_tensors not in (TensorType.PYTORCH, TensorType.NUMPY):
                raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors.value!r}.")
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        if device is None:
            first = raw_audio[0] if isinstance(raw_audio, (list, tuple)) and len(raw_audio) > 0 else raw_audio
            device = first.device if isinstance(first, torch.Tensor) else "cpu"
        device = torch.device(device)

        waveforms, lengths, is_dense_2d = self._to_mono_batch(raw_audio, device)
        non_finite = (~torch.isfinite(waveforms).all(dim=-1)).nonzero().flatten().tolist()
        if non_finite:
            raise ValueError(f"Audio contains NaN or infinite samples (clip indices {non_finite}).")
        too_large = (waveforms.abs().amax(dim=-1) > MAX_ABS_SAMPLE).nonzero().flatten().tolist()
        if too_large:
            raise ValueError(
                f"Audio has samples beyond +-{MAX_ABS_SAMPLE:g} (clip indices {too_large}): floating point audio is "
                "expected in [-1, 1], and such samples give infinite log-mels."
            )
        self._check_lengths(waveforms.shape, lengths, sampling_rate, is_dense_2d)

        if sampling_rate != self.sampling_rate:
            waveforms = resample(waveforms, sampling_rate, self.sampling_rate)
            lengths = [_resampled_length(length, sampling_rate, self.sampling_rate) for length in lengths]
        frames = [1 + (length - self.n_fft) // self.hop_length for length in lengths]
        unpadded = padding == PaddingStrategy.DO_NOT_PAD
        if unpadded and return_tensors is not None and len(set(frames)) > 1:
            raise ValueError(
                f"`padding=False` leaves clips of {min(frames)} to {max(frames)} frames, which cannot be stacked into "
                "one array: pass `return_tensors=None` for one array per clip, or pad."
            )
        input_values = self.normalized_log_mel(waveforms)

        n_frames = torch.tensor(frames, device=device)
        attention_mask = torch.arange(input_values.shape[-1], device=device)[None, :] < n_frames[:, None]
        input_values = input_values.masked_fill(~attention_mask[:, None, :], self.padding_value)

        outputs = {"input_values": input_values}
        if return_attention_mask:
            outputs["attention_mask"] = attention_mask.to(torch.int32)
        if return_tensors != TensorType.PYTORCH:
            outputs = {name: value.cpu().numpy() for name, value in outputs.items()}
            if return_tensors is None:
                outputs = {
                    name: [row[..., :count] if unpadded else row for row, count in zip(value, frames)]
                    for name, value in outputs.items()
                }
        return BatchFeature(outputs, tensor_type=return_tensors)

    def pad(
        self,
        processed_features: BatchFeature | Mapping | list[Mapping],
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
    ) -> BatchFeature:
        """
        Pad featurized clips into a batch, as `__call__` pads a batch of those clips: frames past a clip's end are set
        to `padding_value` and masked out by an int32 `attention_mask`. This is the collate step of
        `DataCollatorWithPadding(feature_extractor)` after featurizing clips one by one (with `datasets.map`, say).

        Takes what [`~SequenceFeatureExtractor.pad`] takes, with each clip's `input_values` `(feature_size, frames)`
        (an array, a tensor or nested lists); `max_length` and `pad_to_multiple_of` count frames. The base class pads
        the first axis, so the clips go through it transposed.
        """
        if isinstance(processed_features, (list, tuple)) and processed_features:
            processed_features = {key: [clip[key] for clip in processed_features] for key in processed_features[0]}
        features, name = dict(processed_features), self.model_input_names[0]
        if name not in features or len(features[name]) == 0:
            raise ValueError(f"`pad` needs featurized clips with `{name}`, got {list(features)}.")
        features[name] = [self._frames_first(index, clip) for index, clip in enumerate(features[name])]
        if not (self.return_attention_mask if return_attention_mask is None else return_attention_mask):
            features.pop("attention_mask", None)
        padded = super().pad(
            features, padding, max_length, truncation, pad_to_multiple_of, return_attention_mask, return_tensors
        )
        values = padded[name]
        if isinstance(values, torch.Tensor):
            padded[name] = values.transpose(1, 2).contiguous()
        else:
            padded[name] = np.ascontiguousarray(values.transpose(0, 2, 1))
        if "attention_mask" in padded:
            mask = padded["attention_mask"]
            padded["attention_mask"] = mask.int() if isinstance(mask, torch.Tensor) else mask.astype(np.int32)
        return padded

    def _frames_first(self, index: int, clip: np.ndarray | torch.Tensor | list) -> np.ndarray | torch.Tensor:
        """A clip's `(feature_size, frames)` input values as `(frames, feature_size)`, as the base class pads."""
        if not isinstance(clip, torch.Tensor):
            clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 2 or clip.shape[0] != self.feature_size:
            raise ValueError(
                f"`pad` expects each clip's input values as (feature_size={self.feature_size}, frames), got shape "
                f"{tuple(clip.shape)} for clip {index}."
            )
        return clip.mT if isinstance(clip, torch.Tensor) else clip.T

    @staticmethod
    def _to_mono_batch(
        raw_audio: np.ndarray | torch.Tensor | list | tuple, device: torch.device
    ) -> tuple[torch.Tensor, list[int], bool]:
        """Float32 mono waveforms `(batch, max_samples)` on `device`, zero padded, with each clip's length."""
        if isinstance(raw_audio, (list, tuple)) and len(raw_audio) > 0 and not _is_sample(raw_audio[0]):
            clips = []
            for index, clip in enumerate(raw_audio):
                clip = _as_tensor(clip)
                if clip.ndim not in (1, 2):
                    raise ValueError(
                        f"Each clip of a list must be 1-D (mono) or 2-D (multichannel); clip {index} has shape "
                        f"{tuple(clip.shape)}."
                    )
                if clip.numel() == 0:
                    raise ValueError(f"Clip {index} is empty (shape {tuple(clip.shape)}).")
                clip = _to_float32(clip.to(device))
                if clip.ndim == 2:
                    clip = clip.mean(dim=_channel_dim(clip.shape))
                clips.append(clip)
            lengths = [clip.shape[0] for clip in clips]
            return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths, False

        audio = _as_tensor(raw_audio)
        if audio.ndim not in (1, 2, 3):
            raise ValueError(
                f"Expected audio with 1 (one clip), 2 (a batch of mono clips) or 3 (a batch of multichannel clips) "
                f"dimensions, got shape {tuple(audio.shape)}."
            )
        if audio.numel() == 0:
            raise ValueError(f"The audio is empty (shape {tuple(audio.shape)}).")
        rank = audio.ndim
        audio = _to_float32(audio.to(device))
        if rank == 1:
            audio = audio[None]
        elif rank == 3:
            audio = audio.mean(dim=1 + _channel_dim(audio.shape[1:]))
        return audio, [audio.shape[-1]] * audio.shape[0], rank == 2

    def _check_lengths(
        self, batch_shape: torch.Size, lengths: list[int], sampling_rate: int, is_dense_2d: bool
    ) -> None:
        """Every clip must fill at least one analysis window once resampled to `self.sampling_rate`."""
        for index, length in enumerate(lengths):
            resampled = _resampled_length(length, sampling_rate, self.sampling_rate)
            if resampled >= self.n_fft:
                continue
            after = f" ({resampled} after resampling to {self.sampling_rate} Hz)" if resampled != length else ""
            message = (
                f"Clip {index} has {length} samples{after}, shorter than one analysis window: at least {self.n_fft} "
                f"samples at {self.sampling_rate} Hz are needed ({1000 * self.n_fft / self.sampling_rate:g} ms)."
            )
            if is_dense_2d and min(batch_shape) <= MAX_CHANNELS:
                message += (
                    f" A 2-D array is read as a batch of mono clips (batch, samples); this one, of shape "
                    f"{tuple(batch_shape)}, looks like a single multichannel clip: pass it wrapped in a list, "
                    "`feature_extractor([audio], ...)`."
                )
            raise ValueError(message)


__all__ = ["MatpacFeatureExtractor", "log_mel_spectrogram", "mel_filter_bank", "resample"]
