"""
The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) for MATPAC, so that evaluation kits such as
`hear-eval-kit` can use a saved or converted model:

    python -m heareval.embeddings.runner modeling_matpac.evaluation.hear --model /path/to/matpac

Timestamp embeddings are the encoder's time steps (the 5 frequency patches of a 16-frame column concatenated, one
step per 160 ms); the scene embedding is their mean, the paper's clip embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..feature_extraction_matpac import MatpacFeatureExtractor
from ..modeling_matpac import MatpacModel, MatpacModelOutput
from .embeddings import MODEL_LOAD_ERRORS


class MatpacHearModel(nn.Module):
    """A MATPAC encoder with its front end and the attributes HEAR requires."""

    def __init__(self, model: MatpacModel, feature_extractor: MatpacFeatureExtractor):
        super().__init__()
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.sample_rate = feature_extractor.sampling_rate
        self.scene_embedding_size = model.config.embedding_size
        self.timestamp_embedding_size = model.config.embedding_size

    def step_centres_ms(self, num_frames: int, device: torch.device) -> torch.Tensor:
        """
        Centre of each time step of a log-mel of `num_frames` frames: a step spans 16 frames (the last one those that
        are left), from its first frame's start to its last frame's end, so every centre lies within the audio.
        """
        hop, window = self.feature_extractor.hop_length, self.feature_extractor.n_fft
        frames_per_step = self.model.config.patch_size
        first_frame = torch.arange(0, num_frames, frames_per_step, device=device)
        last_frame = (first_frame + frames_per_step - 1).clamp(max=num_frames - 1)
        start_sample, end_sample = first_frame * hop, last_frame * hop + window
        return (start_sample + end_sample) / 2 * 1000 / self.sample_rate

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> tuple[MatpacModelOutput, int]:
        """The encoder's outputs for `(n_sounds, n_samples)` audio, and the number of log-mel frames they cover."""
        if audio.ndim != 2:
            raise ValueError(f"HEAR audio must be (n_sounds, n_samples), got shape {tuple(audio.shape)}.")
        device = next(self.model.parameters()).device
        features = self.feature_extractor(audio, sampling_rate=self.sample_rate, return_tensors="pt", device=device)
        return self.model(**features), features["input_values"].shape[-1]


def load_model(model_file_path: str = "", **kwargs) -> MatpacHearModel:
    """Loads a MATPAC directory (saved with `save_pretrained` or converted from the authors' checkpoint)."""
    if not model_file_path:
        raise ValueError("Pass the MATPAC model directory as model_file_path (hear-eval-kit: --model DIR).")
    if Path(model_file_path).is_file():
        raise ValueError(
            f"{model_file_path} is a file: pass the folder that holds the saved model, {Path(model_file_path).parent} "
            "(an authors' checkpoint is converted first: python -m modeling_matpac.convert)."
        )
    try:
        model = MatpacModel.from_pretrained(model_file_path, **{"dtype": torch.float32, **kwargs})
        feature_extractor = MatpacFeatureExtractor.from_pretrained(model_file_path)
    except MODEL_LOAD_ERRORS as error:
        raise ValueError(
            f"Cannot load a MATPAC model from {model_file_path!r} ({str(error).strip().splitlines()[0]}): pass a "
            "directory saved with `save_pretrained` or written by the converter, or a Hub model id."
        ) from error
    return MatpacHearModel(model, feature_extractor)


def get_timestamp_embeddings(audio: torch.Tensor, model: MatpacHearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n_sounds, n_steps, 3840)` embeddings and `(n_sounds, n_steps)` timestamps in milliseconds."""
    outputs, num_frames = model(audio)
    last_hidden_state = outputs.last_hidden_state
    timestamps = model.step_centres_ms(num_frames, last_hidden_state.device)
    return last_hidden_state, timestamps.expand(last_hidden_state.shape[0], -1).contiguous()


def get_scene_embeddings(audio: torch.Tensor, model: MatpacHearModel) -> torch.Tensor:
    """`(n_sounds, 3840)`: the mean of the timestamp embeddings, MATPAC's clip embedding."""
    return model(audio)[0].pooler_output
