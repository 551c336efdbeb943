"""
The authors' released kinds of files through the converter and the public API, against golden outputs of their code:
the AudioSet fine-tuned classifier (fixture section 5) and a downstream probe head on an encoder (section 6).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file
from test_auto import assert_identical_state
from transformers import AutoModel, AutoModelForAudioClassification, pipeline

from modeling_matpac import MatpacFeatureExtractor, MatpacForAudioClassification, MatpacModel
from modeling_matpac.convert import convert_checkpoint, load_original_state_dict, main
from modeling_matpac.evaluation.embeddings import authors_layer_results
from modeling_matpac.evaluation.tasks import ESC50_CLASSES
from modeling_matpac.labels import LABEL_MAPS, load_labels


HEADS = {"num_attention_heads": 4}
CLIPS = ["a", "b", "c"]


def reference_with_labels(name: str) -> tuple[dict[str, torch.Tensor], dict[str, list[list[str]]]]:
    """The tensors and the official top-5 label strings, names only (`"Bark (0.05)"` -> `"Bark"`)."""
    path = FIXTURES / name
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    labels = {
        key.split(".")[0]: [[label.rsplit(" (", 1)[0] for label in row] for row in json.loads(value)]
        for key, value in metadata.items()
    }
    return load_file(path), labels


@pytest.fixture(scope="module")
def audioset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("audioset")
    convert_checkpoint(FIXTURES / "audioset_head_checkpoint.pt", directory, **HEADS)
    return directory


@pytest.fixture(scope="module")
def esc50(tmp_path_factory):
    directory = tmp_path_factory.mktemp("esc50")
    convert_checkpoint(
        FIXTURES / "inference_checkpoint.pt",
        directory,
        probe_head=FIXTURES / "probe_head_esc50.pth",
        task="esc50",
        **HEADS,
    )
    return directory


def max_errors(computed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip: str) -> dict[str, float]:
    return {name: (value - reference[f"{clip}.{name}"]).abs().max().item() for name, value in computed.items()}


@pytest.mark.parametrize("clip", CLIPS)
def test_audioset_classifier_matches_the_authors_code(audioset, clip):
    reference, top5_labels = reference_with_labels("audioset_head.safetensors")
    model = AutoModelForAudioClassification.from_pretrained(audioset).eval()
    assert isinstance(model, MatpacForAudioClassification) and model.config.num_frames == 992
    values = reference[f"{clip}.logmel_norm"]
    with torch.no_grad():
        encoded = model.matpac(values, output_hidden_states=True)
        pooled = model.clip_embedding(encoded)
        logits = model(values).logits
        layers = authors_layer_results(encoded)  # (batch, layers, steps, 5 x 64): average the frequency patches
        per_step = layers.unflatten(-1, (model.config.num_frequency_patches, -1)).mean(-2)
    errors = max_errors(
        {
            "frames.layer_results": per_step,
            "frames.emb": per_step[:, -1],
            "pooled.emb": pooled,
            "pooled.layer_results": per_step.mean(2),
            "head_norm_out": model.embedding_norm(pooled),
            "logits": logits,
            "probs": logits.softmax(-1),
            "sigmoid": logits.sigmoid(),
        },
        reference,
        clip,
    )
    print(clip, {name: f"{error:.1e}" for name, error in errors.items()})
    assert max(errors.values()) <= 1e-4
    assert max(errors["probs"], errors["sigmoid"]) <= 1e-5
    assert torch.equal(logits.topk(5).indices, reference[f"{clip}.top5_index"])
    names = [[model.config.id2label[int(index)] for index in row] for row in logits.topk(5).indices]
    assert names == top5_labels[clip]


def test_audioset_labels_are_the_527_display_names_in_the_authors_order(audioset):
    config = AutoModelForAudioClassification.from_pretrained(audioset).config
    assert config.problem_type == "multi_label_classification"
    assert (config.classifier_pooling, config.classifier_batch_norm) == ("frequency_mean", True)
    labels = [config.id2label[index] for index in range(config.num_labels)]
    assert len(labels) == len(set(labels)) == 527
    # Sorted by mid: /g/122z_qxw, /m/011k_j, /m/01280g first, /t/dd00136 last (the CSV's own index 327 is traffic).
    assert labels[:3] == ["Firecracker", "Timpani", "Wild animals"] and labels[-1] == "Whimper (dog)"
    assert labels[327] == "Shuffle" and labels.index("Speech") != 0
    assert config.label2id == {name: index for index, name in enumerate(labels)}


@pytest.mark.parametrize("clip", CLIPS)
def test_esc50_probe_on_the_encoder_matches_the_authors_code(esc50, clip):
    reference, top5_labels = reference_with_labels("probe_head.safetensors")
    model = AutoModelForAudioClassification.from_pretrained(esc50).eval()
    values = reference[f"{clip}.logmel_norm"]
    with torch.no_grad():
        pooled = model.clip_embedding(model.matpac(values))
        logits = model(values).logits
    errors = max_errors(
        {"pooled.emb": pooled, "logits": logits, "probs": logits.softmax(-1), "sigmoid": logits.sigmoid()},
        reference,
        clip,
    )
    print(clip, {name: f"{error:.1e}" for name, error in errors.items()})
    assert max(errors.values()) <= 1e-4
    assert max(errors["probs"], errors["sigmoid"]) <= 1e-5
    names = [[model.config.id2label[int(index)] for index in row] for row in logits.topk(5).indices]
    assert names == top5_labels[clip]


def test_esc50_labels_follow_the_authors_map(esc50):
    config = AutoModelForAudioClassification.from_pretrained(esc50).config
    with open(FIXTURES.parent.parent / "modeling_matpac" / "label_maps" / "esc50_mapping.json") as file:
        authors = {int(target): name for target, name in json.load(file).items()}
    assert config.id2label == authors
    assert (config.id2label[0], config.id2label[1], config.id2label[49]) == ("dog", "rooster", "hand_saw")
    assert config.problem_type == "single_label_classification" and config.freeze_encoder
    # A probe trained by run_probe.py on ESC-50 numbers its classes the same way.
    assert list(ESC50_CLASSES) == [config.id2label[index] for index in range(50)]
    assert (config.classifier_pooling, config.classifier_batch_norm) == ("concatenate", False)


def test_encoder_only_conversion_of_the_classifier(audioset, tmp_path):
    encoder = convert_checkpoint(FIXTURES / "audioset_head_checkpoint.pt", tmp_path, encoder_only=True, **HEADS)
    assert isinstance(encoder, MatpacModel) and encoder.config.num_frames == 992
    assert isinstance(AutoModel.from_pretrained(tmp_path), MatpacModel)
    assert_identical_state(encoder, AutoModelForAudioClassification.from_pretrained(audioset).matpac)
    reference = load_file(FIXTURES / "audioset_head.safetensors")
    with torch.no_grad():
        frames = encoder.eval()(reference["c.logmel_norm"]).last_hidden_state
    per_step = frames.unflatten(-1, (5, -1)).mean(-2)
    assert frames.shape[1] == 86  # two chunks of 992 frames: 62 + 24 time steps
    assert (per_step - reference["c.frames.emb"]).abs().max() <= 1e-4


def test_pipeline_tags_audioset_and_esc50_with_the_authors_labels(audioset, esc50):
    waveform = load_file(FIXTURES / "inference.safetensors")["b.wav"][0].numpy()
    reference, top5_labels = reference_with_labels("audioset_head.safetensors")
    tags = pipeline("audio-classification", model=str(audioset), device="cpu")(waveform, top_k=5)
    assert [tag["label"] for tag in tags] == top5_labels["b"][0]
    expected = reference["b.sigmoid"][0][reference["b.top5_index"][0]]  # a sigmoid per class: multi-label
    torch.testing.assert_close(torch.tensor([tag["score"] for tag in tags]), expected, atol=1e-5, rtol=0)

    reference, top5_labels = reference_with_labels("probe_head.safetensors")
    classes = pipeline("audio-classification", model=str(esc50), device="cpu")(waveform, top_k=5)
    assert [tag["label"] for tag in classes] == top5_labels["b"][0]
    expected = reference["b.probs"][0][reference["b.top5_index"][0]]  # softmax: single-label
    torch.testing.assert_close(torch.tensor([tag["score"] for tag in classes]), expected, atol=1e-5, rtol=0)


def test_converted_classifier_round_trips_bit_identically(audioset, tmp_path):
    model = MatpacForAudioClassification.from_pretrained(audioset).eval()
    assert model.embedding_norm.running_var.min() < 0.5  # the fixture's statistics, not a fresh BatchNorm's
    original = load_original_state_dict(FIXTURES / "audioset_head_checkpoint.pt")
    assert torch.equal(model.embedding_norm.running_mean, original["head_norm.running_mean"])
    assert int(model.embedding_norm.num_batches_tracked) == 1000
    model.save_pretrained(tmp_path)
    assert_identical_state(model, AutoModelForAudioClassification.from_pretrained(tmp_path))


def test_a_classifier_saved_without_its_batch_counter_converts_to_the_same_tagger(audioset, tmp_path, caplog):
    original = load_original_state_dict(FIXTURES / "audioset_head_checkpoint.pt")
    del original["head_norm.num_batches_tracked"]
    torch.save(original, tmp_path / "no_counter.pt")
    with caplog.at_level("INFO", logger="modeling_matpac.convert"):
        converted = convert_checkpoint(tmp_path / "no_counter.pt", tmp_path / "out", **HEADS).eval()
    assert "no ['embedding_norm.num_batches_tracked']: set to 0" in caplog.text
    assert int(converted.embedding_norm.num_batches_tracked) == 0
    reference = MatpacForAudioClassification.from_pretrained(audioset).eval()
    values = load_file(FIXTURES / "audioset_head.safetensors")["c.logmel_norm"]
    with torch.no_grad():
        assert torch.equal(converted(values).logits, reference(values).logits)


def test_converted_classifier_runs_as_remote_code_in_a_fresh_process(audioset, tmp_path):
    model = MatpacForAudioClassification.from_pretrained(audioset).eval()
    values = load_file(FIXTURES / "audioset_head.safetensors")["c.logmel_norm"]
    with torch.no_grad():
        torch.save(model(values).logits, tmp_path / "expected.pt")
    waveform = load_file(FIXTURES / "inference.safetensors")["b.wav"][0]
    expected_tags = pipeline("audio-classification", model=str(audioset), device="cpu")(waveform.numpy(), top_k=3)
    torch.save(waveform, tmp_path / "waveform.pt")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForAudioClassification, pipeline
        path = {str(audioset)!r}
        model = AutoModelForAudioClassification.from_pretrained(path, trust_remote_code=True).eval()
        assert "modeling_matpac" not in sys.modules, "the package was imported"
        assert type(model).__name__ == "MatpacForAudioClassification"
        values = torch.load({str(tmp_path / "values.pt")!r})
        with torch.no_grad():
            logits = model(values).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(logits, expected), (logits - expected).abs().max()
        tagger = pipeline("audio-classification", model=path, trust_remote_code=True, device="cpu")
        tags = tagger(torch.load({str(tmp_path / "waveform.pt")!r}).numpy(), top_k=3)
        print("TAGS", json.dumps(tags))
        """
    )
    torch.save(values, tmp_path / "values.pt")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    environment["PYTHONPATH"] = ""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tags = json.loads(result.stdout.split("TAGS ", 1)[1])
    assert tags == expected_tags


def test_every_shipped_label_map_reads():
    sizes = {name: len(set(load_labels(name))) for name in LABEL_MAPS}
    assert sizes == {
        "audioset": 527, "esc50": 50, "fsd50k": 200, "openmic": 20,
        "mtg_genre": 87, "mtg_instrument": 40, "mtg_mood": 56, "mtg_top50": 50,
    }  # fmt: skip
    assert load_labels("openmic")[0] == "accordion" and load_labels("mtg_top50")[0] == "genre---alternative"
    assert load_labels("fsd50k")[1] == "Accordion"


@pytest.fixture
def run_converter(capsys):
    """Runs the converter's command line in this process; returns its exit code and its last line on stderr."""

    def run(*arguments) -> tuple[int, str]:
        try:
            main([str(argument) for argument in arguments])
            code = 0
        except SystemExit as stop:
            code = stop.code
        lines = capsys.readouterr().err.strip().splitlines()
        return code, lines[-1] if lines else ""

    return run


def assert_one_clear_error(result: tuple[int, str], message: str) -> None:
    code, last_line = result
    assert code == 2 and message in last_line, last_line


def test_probe_head_of_another_width_is_refused(tmp_path, run_converter):
    torch.save({"probe.weight": torch.zeros(50, 3840), "probe.bias": torch.zeros(50)}, tmp_path / "esc50.pth")
    result = run_converter(
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--probe_head", tmp_path / "esc50.pth",
        "--task", "esc50", "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert_one_clear_error(result, "reads (3840,)-d embeddings, but this encoder's clip embedding is 320-d")
    assert not (tmp_path / "out").exists()


def test_label_map_of_another_length_is_refused(tmp_path, run_converter, monkeypatch):
    shutil.copy(FIXTURES / "probe_head_esc50.pth", tmp_path / "head.pth")  # a name that tells no task
    result = run_converter(
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--probe_head", tmp_path / "head.pth",
        "--task", "openmic", "--output_dir", tmp_path / "out", "--num_attention_heads", "4",
    )  # fmt: skip
    assert_one_clear_error(result, "The head has 50 outputs but the openmic label map names 20 classes")

    import modeling_matpac.labels as labels

    (tmp_path / "maps").mkdir()
    monkeypatch.setattr(labels, "LABEL_MAP_DIR", tmp_path / "maps")
    # Too few entries, one too many (output 50 of a 50-class head), and a gap (49 missing, 50 named instead):
    # each is refused by name, not loaded silently nor failing later with a KeyError.
    for damaged, count in [
        ({"0": "dog", "1": "rooster"}, 2),
        ({str(index): f"c{index}" for index in range(51)}, 51),
        ({**{str(index): f"c{index}" for index in range(49)}, "50": "extra"}, 50),
    ]:
        (tmp_path / "maps/esc50_mapping.json").write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=rf"does not name outputs 0..49 once each \({count} entries\)"):
            labels.load_labels("esc50")


def test_a_probe_named_for_another_task_is_refused(tmp_path, run_converter):
    """Before: an ESC-50 head converted with --task mtg_top50 (50 classes too) got MTG's class names silently."""
    (tmp_path / "esc50").mkdir()
    shutil.copy(FIXTURES / "probe_head_esc50.pth", tmp_path / "esc50" / "esc50.pth")
    result = run_converter(
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--probe_head", tmp_path / "esc50" / "esc50.pth",
        "--task", "mtg_top50", "--output_dir", tmp_path / "out", "--num_attention_heads", "4",
    )  # fmt: skip
    assert_one_clear_error(result, "--task mtg_top50, but the probe file")
    assert "is named for esc50" in result[1] and not (tmp_path / "out").exists()
    result = run_converter(  # before: --encoder_only was ignored and a classifier written
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--probe_head", tmp_path / "esc50" / "esc50.pth",
        "--task", "esc50", "--encoder_only", "--output_dir", tmp_path / "out", "--num_attention_heads", "4",
    )  # fmt: skip
    assert_one_clear_error(result, "--encoder_only and --probe_head contradict each other")


def test_a_file_of_no_known_kind_is_refused(tmp_path, run_converter):
    torch.save({"encoder.weight": torch.zeros(3, 3), "scale": torch.ones(1)}, tmp_path / "other.pt")
    result = run_converter("--checkpoint", tmp_path / "other.pt", "--output_dir", tmp_path / "out")
    assert_one_clear_error(result, "none of the known MATPAC checkpoints")


def test_kinds_are_read_from_the_keys_and_misuse_is_refused(tmp_path, run_converter):
    probe_as_checkpoint = run_converter(
        "--checkpoint", FIXTURES / "probe_head_esc50.pth", "--output_dir", tmp_path / "out"
    )
    assert_one_clear_error(probe_as_checkpoint, "is a probe head: pass it as --probe_head")
    wrong_kind = run_converter(
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--kind", "audioset_classifier",
        "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert_one_clear_error(wrong_kind, "is of kind encoder by its keys, not audioset_classifier")
    probe_on_classifier = run_converter(
        "--checkpoint", FIXTURES / "audioset_head_checkpoint.pt", "--probe_head", FIXTURES / "probe_head_esc50.pth",
        "--task", "esc50", "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert_one_clear_error(probe_on_classifier, "A probe head goes on encoder weights")
    task_without_probe = run_converter(
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--task", "esc50", "--output_dir", tmp_path / "out"
    )
    assert_one_clear_error(task_without_probe, "--probe_head and --task go together")
    torch.save({"probe.weight": torch.zeros(50, 320)}, tmp_path / "half.pth")
    half_probe = run_converter(
        "--checkpoint", FIXTURES / "inference_checkpoint.pt", "--probe_head", tmp_path / "half.pth",
        "--task", "esc50", "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert_one_clear_error(half_probe, "A probe head holds exactly ['probe.bias', 'probe.weight']")
    extra = {**load_original_state_dict(FIXTURES / "audioset_head_checkpoint.pt"), "head.extra": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pt")
    unknown_head_key = run_converter("--checkpoint", tmp_path / "extra.pt", "--output_dir", tmp_path / "out")
    assert_one_clear_error(unknown_head_key, "unexpected ['classifier.extra']")


def test_cli_writes_a_card_that_says_what_where_from_and_how(tmp_path, run_converter):
    result = run_converter(
        "--checkpoint", FIXTURES / "audioset_head_checkpoint.pt", "--kind", "audioset_classifier",
        "--num_attention_heads", "4", "--output_dir", tmp_path / "tagger",
    )  # fmt: skip
    assert result[0] == 0, result[1]
    files = {path.name for path in (tmp_path / "tagger").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files
    card = (tmp_path / "tagger/README.md").read_text()
    for expected in (
        "pipeline_tag: audio-classification",
        "`MatpacForAudioClassification`",
        "`num_frames=992`",
        'classifier_pooling="frequency_mean"',
        "https://github.com/aurianworld/matpac",
        "`audioset_head_checkpoint.pt`, sha256 `57a899250505e541",
        "python -m modeling_matpac.convert --checkpoint audioset_head_checkpoint.pt --num_attention_heads 4",
        "`hidden_states[1:2]`",
        "CC BY-SA 4.0",
        # AudioSet is multi-label: the pipeline scores each class with a sigmoid (see the pipeline test above).
        '- **Scores:** `problem_type="multi_label_classification"`: `pipeline("audio-classification")` applies a '
        "sigmoid (multi-label).",
    ):
        assert expected in card, expected


def test_the_probe_card_says_softmax_and_the_command_that_made_it(esc50):
    """ESC-50 is single-label: its card must not claim the multi-label heads' sigmoid; the command names the probe."""
    card = (esc50 / "README.md").read_text()
    scores = '`problem_type="single_label_classification"`: `pipeline("audio-classification")` applies a softmax.'
    assert f"- **Scores:** {scores} The authors' inference code" in card
    command = (
        "python -m modeling_matpac.convert --checkpoint inference_checkpoint.pt --probe_head probe_head_esc50.pth "
        f"--task esc50 --num_attention_heads 4 --output_dir {esc50.name}"
    )
    assert command in card.splitlines()
    assert "This is a MATPAC encoder of the authors, with the authors' linear probe for ESC-50 on its clip" in card


def test_the_card_names_a_release_only_when_the_weights_fit_it(tmp_path, run_converter):
    """Before: a file named like a release was described as that release, whatever its weights."""
    (tmp_path / "in").mkdir()
    for name, expected in [
        ("matpac_plus_as_48_1_map_enc_and_head.pt", "This is the MATPAC++ encoder (ViT-B) fine-tuned on AudioSet"),
        ("matpac_10_2048.pt", "This is a MATPAC encoder of the authors fine-tuned on AudioSet"),  # 992 frames
    ]:
        shutil.copy(FIXTURES / "audioset_head_checkpoint.pt", tmp_path / "in" / name)
        result = run_converter(
            "--checkpoint", tmp_path / "in" / name, "--num_attention_heads", "4", "--output_dir", tmp_path / name,
        )  # fmt: skip
        assert result[0] == 0, result[1]
        assert expected in (tmp_path / name / "README.md").read_text()


def test_saved_probe_and_an_authors_probe_make_the_same_kind_of_directory(esc50, tmp_path):
    from modeling_matpac.evaluation.probe import LinearProbe, save_classifier

    authors = load_original_state_dict(FIXTURES / "probe_head_esc50.pth")
    weight, bias = authors["probe.weight"].double().numpy(), authors["probe.bias"].double().numpy()
    probe = LinearProbe(mean=0 * weight[0], scale=1 + 0 * weight[0], weight=weight, bias=bias, multi_label=False,
                        best_epoch=1, valid_losses=[1.0])  # fmt: skip
    encoder = AutoModel.from_pretrained(esc50)
    save_classifier(encoder, MatpacFeatureExtractor(), probe, load_labels("esc50"), tmp_path / "saved")

    files = {path.name for path in esc50.iterdir()}
    assert files - {path.name for path in (tmp_path / "saved").iterdir()} == {"README.md"}  # the converter's card
    saved, converted = (json.loads((path / "config.json").read_text()) for path in (tmp_path / "saved", esc50))
    assert saved.keys() == converted.keys()
    for key in ("architectures", "id2label", "label2id", "problem_type", "freeze_encoder", "num_frames",
                "classifier_pooling", "classifier_batch_norm", "hidden_size"):  # fmt: skip
        assert saved[key] == converted[key], key
    first, second = (AutoModelForAudioClassification.from_pretrained(path) for path in (tmp_path / "saved", esc50))
    assert_identical_state(first, second)


def test_classifier_defaults_keep_todays_layout_and_checkpoints(tmp_path):
    from conftest import tiny_config_kwargs

    from modeling_matpac import MatpacConfig

    torch.manual_seed(0)
    model = MatpacForAudioClassification(MatpacConfig(**tiny_config_kwargs(num_labels=3))).eval()
    assert model.embedding_norm is None and model.classifier.in_features == 5 * 32
    assert {key for key in model.state_dict() if not key.startswith("matpac.")} == {
        "classifier.weight",
        "classifier.bias",
    }
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field in ("classifier_pooling", "classifier_batch_norm"):  # a config saved before these fields existed
        config.pop(field)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForAudioClassification.from_pretrained(tmp_path).eval()
    assert_identical_state(model, reloaded)
    values = torch.randn(2, 80, 300)
    assert torch.equal(model(values).logits, reloaded(values).logits)

    tagger = MatpacForAudioClassification(
        MatpacConfig(
            **tiny_config_kwargs(num_labels=3, classifier_pooling="frequency_mean", classifier_batch_norm=True)
        )
    )
    assert tagger.classifier.in_features == 32 and not tagger.embedding_norm.affine
    with pytest.raises(ValueError, match="`classifier_pooling` must be one of"):
        MatpacConfig(classifier_pooling="max")


def test_multi_label_probe_tasks_score_with_a_sigmoid(tmp_path):
    torch.manual_seed(0)
    torch.save({"probe.weight": torch.randn(20, 320) / 18, "probe.bias": torch.zeros(20)}, tmp_path / "openmic.pth")
    model = convert_checkpoint(
        FIXTURES / "inference_checkpoint.pt", tmp_path / "openmic", probe_head=tmp_path / "openmic.pth",
        task="openmic", **HEADS,
    )  # fmt: skip
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.id2label[0] == "accordion" and model.config.id2label[19] == "voice"
    waveform = load_file(FIXTURES / "inference.safetensors")["b.wav"][0].numpy()
    tags = pipeline("audio-classification", model=str(tmp_path / "openmic"), device="cpu")(waveform, top_k=None)
    features = MatpacFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**features).logits.sigmoid()[0]
    assert {tag["label"]: tag["score"] for tag in tags} == pytest.approx(
        {model.config.id2label[index]: score.item() for index, score in enumerate(expected)}, abs=1e-6
    )
