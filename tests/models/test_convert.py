import subprocess
import sys

import pytest
import torch
from conftest import FIXTURE_HEADS, FIXTURES
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForPreTraining

from modeling_matpac import MatpacForPreTraining, MatpacModel
from modeling_matpac.convert import (
    FRONT_END_KEYS,
    authors_key,
    convert_checkpoint,
    convert_state_dict,
    infer_config,
    load_original_state_dict,
    rename_key,
)


def test_cli_converts_the_inference_checkpoint(tmp_path):
    output = tmp_path / "converted"
    command = [
        sys.executable,
        "-m",
        "modeling_matpac.convert",
        "--checkpoint",
        str(FIXTURES / "inference_checkpoint.pt"),
    ]
    command += ["--output_dir", str(output), "--num_attention_heads", "4"]
    subprocess.run(command, check=True, capture_output=True)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {path.name for path in output.iterdir()}

    model = AutoModel.from_pretrained(output)
    assert isinstance(model, MatpacModel)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size) == (64, 3, 256)
    assert (model.config.num_attention_heads, model.config.num_frames) == (4, 608)
    original = load_original_state_dict(FIXTURES / "inference_checkpoint.pt")
    converted = model.state_dict()
    assert len(converted) == len(original) == 42
    for key, tensor in original.items():
        assert torch.equal(converted[rename_key(key).removeprefix("matpac.")], tensor), key
    extractor = AutoFeatureExtractor.from_pretrained(output)
    assert (extractor.mean, extractor.std, extractor.sampling_rate) == (-7.056, 4.193, 16000)
    # The card records the command that remakes it: encoder weights need no --encoder_only.
    card = (output / "README.md").read_text().splitlines()
    command_line = "python -m modeling_matpac.convert --checkpoint inference_checkpoint.pt --num_attention_heads 4"
    assert f"{command_line} --output_dir converted" in card
    assert "pipeline_tag: feature-extraction" in card

    # Before: a second conversion into the same folder replaced the model and its card without a word.
    weights = (output / "model.safetensors").read_bytes()
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "converted' is not empty: pass --overwrite_output_dir" in again.stderr.splitlines()[-1]
    assert (output / "model.safetensors").read_bytes() == weights
    subprocess.run(command + ["--overwrite_output_dir"], check=True, capture_output=True)
    assert (output / "model.safetensors").read_bytes() == weights


def test_a_head_count_that_cannot_be_read_from_the_weights_is_named(tmp_path, caplog):
    """The fixture's 64-wide encoder converted without --num_attention_heads gets 1 head of 64: said, not silent."""
    with caplog.at_level("WARNING", logger="modeling_matpac.convert"):
        model = convert_checkpoint(FIXTURES / "pretraining_init_state.pt", tmp_path / "default")
    assert model.config.num_attention_heads == 1
    assert "The encoder is 64 wide, not ViT-B's 768: its head count cannot be read" in caplog.text
    assert "1 heads of 64 are assumed (pass --num_attention_heads" in caplog.text
    assert f"The predictor is {model.config.predictor_hidden_size} wide, not the paper's 512" in caplog.text
    assert model.config.predictor_num_attention_heads == 1
    assert "1 heads of 32 are assumed (pass --predictor_num_attention_heads" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_matpac.convert"):
        convert_checkpoint(FIXTURES / "pretraining_init_state.pt", tmp_path / "given", **FIXTURE_HEADS)
    assert "wide, not" not in caplog.text


def test_the_published_widths_get_the_published_head_counts(caplog):
    """
    The weights do not tell the head count: a ViT-B encoder (768 wide) gets 12 heads of 64, the paper's 512-wide
    predictor 16 heads of 32, without a warning. Shapes only, on the meta device (the fixtures are too narrow to tell).
    """

    def shape(*size):
        return torch.empty(size, device="meta")

    state_dict = {
        "cls_token": shape(1, 1, 768),
        "pos_embed": shape(1, 191, 768),
        "patch_embed.proj.weight": shape(768, 1, 16, 16),
        **{f"student_encoder.blocks.{index}.mlp.fc1.weight": shape(3072, 768) for index in range(12)},
        "decoder.decoder_embed.weight": shape(512, 768),
        "decoder.decoder_blocks.0.mlp.fc1.weight": shape(2048, 512),
    }
    with caplog.at_level("WARNING", logger="modeling_matpac.convert"):
        config = infer_config(state_dict)
    assert (config.hidden_size, config.num_hidden_layers, config.num_frames) == (768, 12, 608)
    assert (config.num_attention_heads, config.predictor_hidden_size, config.predictor_num_attention_heads) == (
        12,
        512,
        16,
    )
    assert "wide, not" not in caplog.text


def test_safetensors_and_pt_checkpoints_convert_identically(tmp_path):
    from_pt = convert_checkpoint(FIXTURES / "inference_checkpoint.pt", tmp_path / "pt", **FIXTURE_HEADS)
    from_st = convert_checkpoint(FIXTURES / "inference_checkpoint.safetensors", tmp_path / "st", **FIXTURE_HEADS)
    for (name, first), (_, second) in zip(from_pt.state_dict().items(), from_st.state_dict().items()):
        assert torch.equal(first, second), name


def test_training_checkpoint_becomes_a_pretraining_model_with_both_teachers(tmp_path):
    model = convert_checkpoint(FIXTURES / "pretraining_init_state.pt", tmp_path / "pt", **FIXTURE_HEADS)
    assert isinstance(model, MatpacForPreTraining)
    config = model.config
    assert (config.predictor_hidden_size, config.predictor_num_hidden_layers, config.head_num_prototypes) == (
        32,
        1,
        128,
    )
    assert (config.head_hidden_size, config.head_bottleneck_size, config.head_num_layers) == (64, 256, 3)
    reference = {
        key[len("init.") :]: value
        for key, value in load_file(FIXTURES / "pretraining.safetensors").items()
        if key.startswith("init.")
    }
    state = model.state_dict()
    assert len(reference) == len(state) == 93
    for key, tensor in reference.items():
        assert torch.equal(state[rename_key(key)], tensor), key
    head = model.teacher_head.last_layer
    expected_weight = reference["_cls_head_ema.last_layer.weight_g"] * torch.nn.functional.normalize(
        reference["_cls_head_ema.last_layer.weight_v"], dim=1
    )
    torch.testing.assert_close(head.weight, expected_weight)

    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path / "pt")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    student = AutoModel.from_pretrained(tmp_path / "pt")
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, state[f"matpac.{name}"]), name


def test_encoder_only_conversion_of_a_training_checkpoint(tmp_path, caplog):
    """The student encoder alone; its card says so, and its command keeps --encoder_only (a training state's)."""
    with caplog.at_level("INFO"):
        model = convert_checkpoint(
            FIXTURES / "pretraining_init_state.pt", tmp_path / "student", encoder_only=True, **FIXTURE_HEADS
        )
    assert isinstance(model, MatpacModel)
    assert "Dropped 63 training-only tensors" in caplog.text
    card = (tmp_path / "student" / "README.md").read_text()
    assert "This is a MATPAC training state of the authors (the student encoder only), converted for" in card
    assert "pipeline_tag: feature-extraction" in card
    command = (
        "python -m modeling_matpac.convert --checkpoint pretraining_init_state.pt --encoder_only "
        "--num_attention_heads 4 --predictor_num_attention_heads 4 --output_dir student"
    )
    assert command in card.splitlines()


def test_unknown_missing_and_misshaped_keys_are_reported():
    original = load_original_state_dict(FIXTURES / "inference_checkpoint.pt")
    config = infer_config(original, **FIXTURE_HEADS)
    with pytest.raises(ValueError, match=r"not MATPAC weights: \['extra.weight'\]"):
        convert_state_dict({**original, "extra.weight": torch.zeros(1)}, config, encoder_only=True)
    incomplete = {key: value for key, value in original.items() if key != "student_encoder.norm.weight"}
    missing = r"missing \['encoder.layernorm.weight'\], .* in the authors' naming: \['student_encoder.norm.weight'\]"
    with pytest.raises(ValueError, match=missing):
        convert_state_dict(incomplete, config, encoder_only=True)
    misshaped = {**original, "student_encoder.norm.bias": torch.zeros(65)}
    with pytest.raises(ValueError, match=r"student_encoder.norm.bias \(encoder.layernorm.bias\): \(65,\) vs \(64,\)"):
        convert_state_dict(misshaped, config, encoder_only=True)
    front_end = {**original, "log_mel.MelSpectrogram.mel_scale.fb": torch.zeros(201, 80)}
    assert isinstance(convert_state_dict(front_end, config, encoder_only=True), MatpacModel)


@pytest.mark.parametrize(
    "name",
    ["inference_checkpoint.pt", "audioset_head_checkpoint.pt", "pretraining_init_state.pt", "mcl_init_state.pt"],
)
def test_every_key_of_the_authors_files_is_named_back_from_ours(name):
    original = load_original_state_dict(FIXTURES / name)
    ours = {key: rename_key(key) for key in original if not FRONT_END_KEYS.match(key)}
    assert len(ours) > 20 and None not in ours.values()
    assert {key: authors_key(renamed) for key, renamed in ours.items()} == {key: key for key in ours}


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_original_state_dict(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_original_state_dict(corrupt)
    with pytest.raises(ValueError, match="only encoder weights"):
        convert_checkpoint(FIXTURES / "inference_checkpoint.pt", tmp_path / "out", encoder_only=False)
    torch.save({"_ema": {"blocks.0.norm1.weight": 1.0}}, tmp_path / "nested.pt")  # before: an AttributeError
    with pytest.raises(ValueError, match=r"Entry '_ema.blocks.0.norm1.weight' of .* is a float, not a tensor"):
        load_original_state_dict(tmp_path / "nested.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_matpac.convert",
            "--checkpoint",
            str(corrupt),
            "--output_dir",
            str(tmp_path / "new"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("python -m modeling_matpac.convert: error: ")
    assert "not a readable PyTorch checkpoint" in result.stderr


def test_a_head_count_of_0_and_a_file_for_output_dir_are_refused(tmp_path):
    """Before: 0 heads meant the default count (a model saved without a word), a file an AssertionError traceback."""
    with pytest.raises(ValueError, match="`num_attention_heads` must be positive, got 0"):
        convert_checkpoint(FIXTURES / "inference_checkpoint.pt", tmp_path / "out", num_attention_heads=0)
    with pytest.raises(ValueError, match="`predictor_num_attention_heads` must be positive, got 0"):
        convert_checkpoint(FIXTURES / "pretraining_init_state.pt", tmp_path / "out", predictor_num_attention_heads=0)
    assert not (tmp_path / "out").exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="--output_dir '.*a-file' is a file, not a folder"):
        convert_checkpoint(FIXTURES / "inference_checkpoint.pt", tmp_path / "a-file", **FIXTURE_HEADS)


class LoggedMeter:
    """Stands for the objects of a training framework that a checkpoint can pickle besides its weights."""

    def __init__(self, value: float):
        self.value = value


def test_fairseq_training_checkpoint_converts_like_its_state_dict(tmp_path):
    import argparse

    import numpy

    state = torch.load(FIXTURES / "pretraining_init_state.pt", weights_only=True)
    training_checkpoint = {
        "args": argparse.Namespace(arch="matpac", lr=[0.0003]),
        "cfg": {"common": {"seed": 1}},
        "model": state,
        "optimizer_history": [{"optimizer_name": "FairseqAdam", "num_updates": numpy.int64(10)}],
        "extra_state": {"val_loss": numpy.float32(0.5), "metrics": {"loss": numpy.array([1.5, 2.5])}},
    }
    torch.save(training_checkpoint, tmp_path / "checkpoint_last.pt")
    flat = load_original_state_dict(tmp_path / "checkpoint_last.pt")
    reference = load_original_state_dict(FIXTURES / "pretraining_init_state.pt")
    assert flat.keys() == reference.keys() and len(flat) == 93
    for key, tensor in reference.items():
        assert torch.equal(flat[key], tensor), key

    training_checkpoint["extra_state"]["meter"] = LoggedMeter(1.5)
    torch.save(training_checkpoint, tmp_path / "with_objects.pt")
    with pytest.raises(ValueError) as error:
        load_original_state_dict(tmp_path / "with_objects.pt")
    message = str(error.value)
    assert "holds objects that are not weights (test_convert.LoggedMeter)" in message
    assert "load it with weights_only=False, save its weights alone with torch.save" in message
    assert "(the state dict of its 'model' entry, or `.state_dict()` of a pickled module)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("pickle.pt", b"\x80\x02garbage", "is not a readable PyTorch checkpoint: "),
        (
            "truncated.pt",
            (FIXTURES / "inference_checkpoint.pt").read_bytes()[:3000],
            "failed finding central directory",
        ),
        ("truncated.safetensors", (FIXTURES / "inference_checkpoint.safetensors").read_bytes()[:2000], "safetensors"),
    ],
)
def test_a_corrupt_checkpoint_is_refused_in_one_line(name, content, message, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_original_state_dict(tmp_path / name)
    assert str(error.value).startswith(f"{tmp_path / name} is not a readable ")
    assert "\n" not in str(error.value)


def test_a_half_precision_checkpoint_is_saved_in_float32_and_says_so(tmp_path, caplog):
    state = torch.load(FIXTURES / "inference_checkpoint.pt", weights_only=True)
    halved = {key: tensor.half() if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    torch.save(halved, tmp_path / "half.pt")
    with caplog.at_level("INFO", logger="modeling_matpac.convert"):
        model = convert_checkpoint(tmp_path / "half.pt", tmp_path / "out", num_attention_heads=4)
    assert "The checkpoint stores torch.float16 tensors; they are saved as float32." in caplog.text
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert torch.equal(model.embeddings.patch_embeddings.projection.weight, halved["patch_embed.proj.weight"].float())


@pytest.mark.parametrize("wrapping", ["module", "state_dict"])
def test_wrapped_weights_are_named_as_such(tmp_path, wrapping):
    state = torch.load(FIXTURES / "inference_checkpoint.pt", weights_only=True)
    if wrapping == "module":  # as DistributedDataParallel saves them
        torch.save({f"module.{key}": tensor for key, tensor in state.items()}, tmp_path / "wrapped.pt")
    else:
        torch.save({"state_dict": state}, tmp_path / "wrapped.pt")
    message = f"Its keys all start with '{wrapping}.': the weights are wrapped in a '{wrapping}' entry or prefix"
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(tmp_path / "wrapped.pt", tmp_path / "out")
