"""The HEAR API wrapper on a tiny random MATPAC."""

import logging

import numpy as np
import pytest
import torch
from test_tasks import save_tiny_matpac

from modeling_matpac import MatpacConfig, MatpacFeatureExtractor, MatpacModel
from modeling_matpac.evaluation import hear


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hear.load_model(str(save_tiny_matpac(tmp_path_factory.mktemp("tiny-matpac"))))


@pytest.fixture(scope="module")
def audio():
    return torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (3, 24000)).astype(np.float32))  # 1.5 s


def test_model_exposes_the_required_attributes(model):
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 5 * 32
    assert isinstance(model, torch.nn.Module)


def test_timestamp_embeddings_and_their_times(model, audio):
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    # 1.5 s -> 1 + (24000 - 400) // 160 = 148 frames -> ceil(148 / 16) = 10 steps, the last of 148 - 144 = 4 frames
    assert embeddings.shape == (3, 10, 160) and timestamps.shape == (3, 10)
    # a full step t covers samples [2560 t, 2560 t + 15 * 160 + 400): centre 160 t + 87.5 ms; the last one covers
    # [23040, 23040 + 3 * 160 + 400): centre 1467.5 ms (before: 1527.5 ms, as if it had 16 frames)
    expected = torch.cat([160 * torch.arange(9) + 87.5, torch.tensor([1467.5])])
    for row in timestamps:
        torch.testing.assert_close(row, expected.float())


@pytest.mark.parametrize("num_samples", [400, 559, 16000, 31680, 43840, 97440])
def test_every_timestamp_lies_within_the_audio(model, num_samples):
    """Before: the last step's centre assumed 16 frames, past the end for 39 % of lengths; hear-validator refused."""
    audio = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, (1, num_samples)).astype(np.float32))
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert timestamps.shape == embeddings.shape[:2] and timestamps[0, 0] > 0
    assert timestamps.max() <= num_samples / 16 and bool((timestamps.diff(dim=1) > 0).all())


def test_a_step_spans_the_model_patch_size_in_frames(audio):
    """The steps follow `config.patch_size`: with 8-frame patches, one step every 80 ms and as many times as steps."""
    torch.manual_seed(0)
    config = MatpacConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8
    )
    model = hear.MatpacHearModel(MatpacModel(config), MatpacFeatureExtractor())
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    # 148 frames -> ceil(148 / 8) = 19 steps of 10 * 32 values; a full step t covers [1280 t, 1280 t + 7 * 160 + 400)
    assert embeddings.shape == (3, 19, 320) and timestamps.shape == (3, 19)
    expected = torch.cat([80 * torch.arange(18) + 47.5, torch.tensor([1467.5])])  # the last step: frames 144 to 147
    for row in timestamps:
        torch.testing.assert_close(row, expected.float())


def test_the_audio_rate_is_passed_to_the_feature_extractor(model, audio, caplog):
    """HEAR audio comes at `model.sample_rate`: the wrapper says so, else every batch logs a missing-rate warning."""
    with caplog.at_level(logging.WARNING):
        hear.get_timestamp_embeddings(audio, model)
        hear.get_scene_embeddings(audio, model)
    assert caplog.text == ""


def test_scene_embedding_is_the_mean_of_the_timestamp_embeddings(model, audio):
    embeddings, _ = hear.get_timestamp_embeddings(audio, model)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 160)
    torch.testing.assert_close(scene, embeddings.mean(1))
    torch.testing.assert_close(hear.get_scene_embeddings(audio[1:2], model), scene[1:2], atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\)"):
        hear.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(ValueError, match="model directory"):
        hear.load_model("")
    missing = tmp_path / "no-model"
    with pytest.raises(ValueError, match=f"Cannot load a MATPAC model from '{missing}'"):
        hear.load_model(str(missing))
    saved = save_tiny_matpac(tmp_path / "tiny")
    for name in ("config.json", "model.safetensors"):  # before: an UnpicklingError from torch for config.json
        with pytest.raises(ValueError, match=f"is a file: pass the folder that holds the saved model, {saved}"):
            hear.load_model(str(saved / name))


def test_load_model_options_reach_from_pretrained(tmp_path):
    """Before: `dtype` (e.g. from heareval's --model-options) clashed with the wrapper's own float32."""
    saved = str(save_tiny_matpac(tmp_path / "tiny"))
    assert next(hear.load_model(saved).parameters()).dtype == torch.float32
    assert next(hear.load_model(saved, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
