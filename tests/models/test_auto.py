import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForPreTraining,
)

from modeling_matpac import (
    MatpacConfig,
    MatpacFeatureExtractor,
    MatpacForAudioClassification,
    MatpacForPreTraining,
    MatpacModel,
)


def assert_identical_state(first: torch.nn.Module, second: torch.nn.Module) -> None:
    """Every parameter and buffer, persistent or not, bit for bit."""
    for kind in ("named_parameters", "named_buffers"):
        left, right = dict(getattr(first, kind)()), dict(getattr(second, kind)())
        assert left.keys() == right.keys(), kind
        for name, tensor in left.items():
            assert tensor.dtype == right[name].dtype and torch.equal(tensor, right[name]), name


def trained_looking_pretraining_model() -> MatpacForPreTraining:
    """A pre-training model whose teachers and centre differ from a fresh init, so a lost tensor shows."""
    torch.manual_seed(0)
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs()))
    with torch.no_grad():
        for param in list(model.teacher_encoder.parameters()) + list(model.teacher_head.parameters()):
            param.add_(torch.randn_like(param))
        model.center.copy_(torch.rand_like(model.center))
        model.matpac.embeddings.position_embeddings.mul_(2)
    return model


@pytest.mark.parametrize(
    "model_class, auto_class",
    [
        (MatpacModel, AutoModel),
        (MatpacForPreTraining, AutoModelForPreTraining),
        (MatpacForAudioClassification, AutoModelForAudioClassification),
    ],
)
def test_save_load_round_trip_is_bit_identical(tmp_path, model_class, auto_class):
    if model_class is MatpacForPreTraining:
        model = trained_looking_pretraining_model()
    else:
        torch.manual_seed(0)
        model = model_class(MatpacConfig(**tiny_config_kwargs(num_labels=4)))
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is model_class
    assert_identical_state(model, loaded)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {name for name, param in loaded.named_parameters() if param.requires_grad} == trainable
    assert not any("position_embeddings" in name or name.startswith("teacher_") for name in trainable)


def test_auto_classes_resolve_after_import(tmp_path):
    model = trained_looking_pretraining_model()
    model.save_pretrained(tmp_path)
    MatpacFeatureExtractor().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MatpacConfig)
    assert isinstance(AutoFeatureExtractor.from_pretrained(tmp_path), MatpacFeatureExtractor)
    student = AutoModel.from_pretrained(tmp_path)
    assert isinstance(student, MatpacModel)
    assert_identical_state(student, model.matpac)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_matpac.MatpacConfig",
        "AutoModel": "modeling_matpac.MatpacModel",
        "AutoModelForPreTraining": "modeling_matpac.MatpacForPreTraining",
        "AutoModelForAudioClassification": "modeling_matpac.MatpacForAudioClassification",
    }
    assert {"configuration_matpac.py", "modeling_matpac.py", "feature_extraction_matpac.py", "audio.py"} <= {
        path.name for path in tmp_path.iterdir()
    }


def test_remote_code_loads_in_a_process_that_never_imports_the_package(tmp_path):
    model = trained_looking_pretraining_model().eval()
    model.save_pretrained(tmp_path / "model")
    MatpacFeatureExtractor().save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    waveform = torch.randn(2, 20000) * 0.1
    torch.save(waveform, tmp_path / "waveform.pt")
    features = MatpacFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model.matpac(**features).pooler_output
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoFeatureExtractor, AutoModel, AutoModelForPreTraining
        path = {str(tmp_path / "model")!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=True)
        pretraining = AutoModelForPreTraining.from_pretrained(path, trust_remote_code=True)
        assert "modeling_matpac" not in sys.modules, "the package was imported"
        assert type(model).__name__ == "MatpacModel" and type(pretraining).__name__ == "MatpacForPreTraining"
        waveform = torch.load({str(tmp_path / "waveform.pt")!r})
        with torch.no_grad():
            pooled = model(**extractor(waveform, sampling_rate=16000, return_tensors="pt")).pooler_output
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(pooled, expected), (pooled - expected).abs().max()
        print("remote code ok", tuple(pooled.shape))
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    environment["PYTHONPATH"] = ""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok (2, 160)" in result.stdout
