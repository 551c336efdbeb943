"""The HEAR API wrapper on a tiny random MATPAC."""

import numpy as np
import pytest
import torch
from test_tasks import save_tiny_matpac

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
    # 1.5 s -> 1 + (24000 - 400) // 160 = 148 frames -> ceil(148 / 16) = 10 steps of 16 frames
    assert embeddings.shape == (3, 10, 160) and timestamps.shape == (3, 10)
    # step t covers samples [2560 t, 2560 t + 15 * 160 + 400): centre 160 t + 87.5 ms
    expected = 160 * torch.arange(10) + 87.5
    for row in timestamps:
        torch.testing.assert_close(row, expected.float())


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
