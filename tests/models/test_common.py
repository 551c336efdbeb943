"""The contract every MATPAC model class keeps, in the spirit of transformers' `ModelTesterMixin`."""

import pytest
import torch
from conftest import tiny_config_kwargs
from safetensors.torch import load_file, save_file

from modeling_matpac import MatpacConfig, MatpacForAudioClassification, MatpacForPreTraining, MatpacModel
from modeling_matpac.modeling_matpac import MatpacPatchEmbeddings


CLASSES = [MatpacModel, MatpacForPreTraining, MatpacForAudioClassification]
BATCH, FRAMES = 2, 700  # two chunks of 608 frames, the second one padded


def make(model_class, **overrides):
    torch.manual_seed(0)
    return model_class(MatpacConfig(**tiny_config_kwargs(num_labels=3, **overrides)))


def inputs_for(model_class) -> dict:
    generator = torch.Generator().manual_seed(1)
    if model_class is MatpacForPreTraining:
        return {
            "input_values": torch.randn(BATCH, 80, 608, generator=generator),
            "noise": torch.rand(BATCH, 190, generator=generator),
            "step": 1,
        }
    attention_mask = torch.ones(BATCH, FRAMES, dtype=torch.long)
    attention_mask[1, 500:] = 0
    inputs = {"input_values": torch.randn(BATCH, 80, FRAMES, generator=generator), "attention_mask": attention_mask}
    if model_class is MatpacForAudioClassification:
        inputs["labels"] = torch.tensor([0, 2])
    return inputs


def skip_pretraining_outputs(model_class):
    if model_class is MatpacForPreTraining:
        pytest.skip("MatpacForPreTraining returns losses and training statistics; its encoder is `model.matpac`")


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("model_class", CLASSES)
def test_tuple_and_dict_outputs_are_equivalent(model_class):
    model, inputs = make(model_class).eval(), inputs_for(model_class)
    with torch.no_grad():
        as_dict, as_tuple = model(**inputs), model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for from_dict, from_tuple in zip(as_dict.to_tuple(), as_tuple):
        assert torch.equal(from_dict, from_tuple)


@pytest.mark.parametrize("model_class", CLASSES)
def test_hidden_states_count_and_shape(model_class):
    skip_pretraining_outputs(model_class)
    model = make(model_class).eval()
    with torch.no_grad():
        outputs = model(**inputs_for(model_class), output_hidden_states=True)
        plain = model(**inputs_for(model_class))
    time_steps = -(-FRAMES // 16)
    assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
    assert all(state.shape == (BATCH, time_steps, 5 * 32) for state in outputs.hidden_states)
    assert plain.hidden_states is None and plain.attentions is None


@pytest.mark.parametrize("model_class", CLASSES)
def test_attentions_count_and_shape(model_class):
    skip_pretraining_outputs(model_class)
    model = make(model_class, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = model(**inputs_for(model_class), output_attentions=True)
    tokens = 1 + 5 * 38  # each chunk: CLS and 5 x 38 patches
    assert len(outputs.attentions) == model.config.num_hidden_layers
    assert all(weights.shape == (BATCH * 2, 2, tokens, tokens) for weights in outputs.attentions)
    # Rows are distributions; no query attends to batch padding. Chunks (clip, chunk): valid 16-frame time steps.
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(BATCH * 2, 2, tokens))
    for index, valid_steps in enumerate([38, -(-(700 - 608) // 16), -(-500 // 16), 0]):  # (0, 0) (0, 1) (1, 0) (1, 1)
        visible = torch.cat([torch.tensor([True]), (torch.arange(38) < valid_steps).repeat(5)])
        weights = outputs.attentions[0][index]
        assert torch.all(weights[..., ~visible] == 0) and torch.all(weights[..., visible] > 0), index
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        make(model_class)(**inputs_for(model_class), output_attentions=True)


@pytest.mark.parametrize("model_class", CLASSES)
def test_get_input_embeddings(model_class):
    model = make(model_class)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, MatpacPatchEmbeddings)
    base = model if model_class is MatpacModel else model.matpac
    assert embeddings is base.embeddings.patch_embeddings


@pytest.mark.parametrize("model_class", CLASSES)
def test_missing_weights_are_initialised(tmp_path, model_class):
    """What a checkpoint lacks is created on the meta device by `from_pretrained`: it must get `_init_weights`."""
    model = make(model_class)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = [key for key in state if key.endswith(("layernorm.weight", "position_embeddings", "cls_token"))]
    save_file({key: value for key, value in state.items() if key not in dropped}, tmp_path / "model.safetensors")
    loaded = model_class.from_pretrained(tmp_path)
    for name, tensor in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    loaded_state = loaded.state_dict()
    for key in dropped:
        if key.endswith("layernorm.weight"):
            assert torch.all(loaded_state[key] == 1), key
        elif key.endswith("position_embeddings"):
            assert torch.equal(loaded_state[key], state[key]), key  # fixed sin-cos: recomputed exactly
        else:
            assert loaded_state[key].std().item() == pytest.approx(0.02, rel=0.5), key
    for key in set(state) - set(dropped):
        assert torch.equal(loaded_state[key], state[key]), key


@pytest.mark.parametrize("model_class", CLASSES)
def test_ignore_mismatched_sizes_for_a_new_number_of_labels(tmp_path, model_class):
    if model_class is not MatpacForAudioClassification:
        pytest.skip(f"{model_class.__name__} has no head sized by `num_labels`")
    model = make(model_class)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch|mismatched"):
        model_class.from_pretrained(tmp_path, num_labels=5)
    loaded = model_class.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert loaded.classifier.weight.shape == (5, 160) and loaded.config.num_labels == 5
    for name, tensor in model.matpac.state_dict().items():
        assert torch.equal(loaded.matpac.state_dict()[name], tensor), name
    with torch.no_grad():
        assert loaded(**{**inputs_for(model_class), "labels": torch.tensor([0, 4])}).logits.shape == (BATCH, 5)


@pytest.mark.parametrize(
    "model_class, overrides",
    [(MatpacModel, {}), (MatpacForPreTraining, {}), (MatpacForAudioClassification, {"freeze_encoder": True})],
)
def test_requires_grad_after_load_is_that_of_a_fresh_model(tmp_path, model_class, overrides):
    model = make(model_class, **overrides)
    model.save_pretrained(tmp_path)
    assert trainable(model_class.from_pretrained(tmp_path)) == trainable(model)
    if model_class is MatpacForPreTraining:
        assert not any(name.startswith("teacher_") for name in trainable(model))
    if overrides:
        assert trainable(model) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("model_class", CLASSES)
def test_bf16_loading_keeps_the_teachers_and_the_centre_fp32(tmp_path, model_class):
    """The bf16-loaded model's outputs are the fp32 model's within bf16 rounding, not merely finite."""
    model = make(model_class).eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    for name, tensor in loaded.state_dict().items():
        expected = torch.float32 if name.startswith("teacher_") or name == "center" else torch.bfloat16
        assert tensor.dtype == expected, name
    inputs = {
        name: value.bfloat16() if name == "input_values" else value for name, value in inputs_for(model_class).items()
    }
    if model_class is MatpacForPreTraining:
        with pytest.raises(ValueError, match="Pre-training needs float32 weights"):
            loaded(**inputs)
        return
    with torch.no_grad():
        outputs = loaded(**inputs)
        expected = model(**inputs_for(model_class))
    assert outputs.keys() == expected.keys()
    for name, value in expected.items():
        if value.dtype == torch.bool:  # the time mask
            assert torch.equal(outputs[name], value), name
            continue
        # bf16 keeps 8 significant bits: its relative spacing (ulp) is at most 2**-7. Through this encoder the
        # roundings add up to 2**-7 of an output's largest magnitude at most (last_hidden_state: 0.030 of 3.8, the
        # others 2**-8); 2**-5, four times that, leaves room for other CPUs' kernels, and a padding key left unmasked
        # in the bf16 attention is still seen (0.04 to 0.06). Relative to the largest magnitude, not per element:
        # entries near 0 carry the absolute error of their larger inputs.
        tolerance = 2**-5 * value.abs().max().item()
        torch.testing.assert_close(outputs[name].float(), value, rtol=0, atol=tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model_class", CLASSES)
def test_device_map_cpu(tmp_path, model_class):
    model = make(model_class).eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path, device_map="cpu").eval()
    assert {tensor.device.type for tensor in loaded.state_dict().values()} == {"cpu"}
    with torch.no_grad():
        for expected, actual in zip(
            model(**inputs_for(model_class)).to_tuple(), loaded(**inputs_for(model_class)).to_tuple()
        ):
            assert torch.equal(expected, actual)
