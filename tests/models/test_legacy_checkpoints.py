"""Checkpoints saved by the code of commit 35f5365 (tests/fixtures/legacy_v0) load with identical outputs."""

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from modeling_matpac import MatpacFeatureExtractor, MatpacForAudioClassification, MatpacForPreTraining


LEGACY = FIXTURES / "legacy_v0"


@pytest.fixture(scope="module")
def expected():
    return load_file(LEGACY / "expected.safetensors")


def test_pretraining_checkpoint_loads_with_identical_outputs(expected):
    model = MatpacForPreTraining.from_pretrained(LEGACY / "pretraining").eval()
    with torch.no_grad():
        outputs = model(expected["pretraining.input_values"], noise=expected["pretraining.noise"], step=2)
    for name in ("loss", "loss_pred", "loss_cls", "teacher_sum"):
        assert torch.equal(getattr(outputs, name), expected[f"pretraining.{name}"]), name
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert not any(name.startswith("teacher_") or "position_embeddings" in name for name in trainable)


def test_audio_classification_checkpoint_loads_with_identical_outputs(expected):
    model = MatpacForAudioClassification.from_pretrained(LEGACY / "audio_classification").eval()
    assert model.config.id2label == {0: "dog", 1: "rain", 2: "siren"}
    values, mask = expected["classification.input_values"], expected["classification.attention_mask"]
    with torch.no_grad():
        encoder = model.matpac(values, attention_mask=mask, output_hidden_states=True)
        logits = model(values, attention_mask=mask).logits
    # Since issue 13 a padded clip's short chunk is encoded at its own length instead of padded and masked: the same
    # embeddings up to float rounding (at most 9.5e-7 here, values up to 6.9), and zeros at the padded steps (which
    # 35f5365 filled). The unpadded clip (row 0) is compared with 35f5365's outputs. The padded one (row 1, 90 frames)
    # is not: its padding holds random values, and 35f5365 read the 6 of them that share its last patch, where
    # masked frames now read as zeros, so that it gets its embedding alone.
    valid = encoder.time_mask
    states = torch.stack([encoder.last_hidden_state, *encoder.hidden_states])
    expected_states = torch.stack(
        [expected["classification.last_hidden_state"], *expected["classification.hidden_states"]]
    )
    assert mask[0].all() and mask[1].sum() == 90 and values[1, :, 90:96].abs().min() > 0
    torch.testing.assert_close(states[:, 0, valid[0]], expected_states[:, 0, valid[0]], atol=2e-6, rtol=0)
    assert torch.all(states[:, ~valid] == 0)
    torch.testing.assert_close(
        encoder.pooler_output[0], expected["classification.pooler_output"][0], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(logits[0], expected["classification.logits"][0], atol=1e-6, rtol=0)
    with torch.no_grad():
        alone = model(values[1:, :, :90]).logits
    torch.testing.assert_close(logits[1:], alone, atol=1e-6, rtol=0)


def test_feature_extractor_settings_load(expected):
    loaded = MatpacFeatureExtractor.from_pretrained(LEGACY / "audio_classification")
    waveform = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    reference = MatpacFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    features = loaded(waveform, sampling_rate=16000, return_tensors="pt")
    assert torch.equal(features["input_values"], reference["input_values"])
