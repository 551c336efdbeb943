import pytest
import torch
from conftest import FIXTURE_HEADS, FIXTURES, tiny_config_kwargs
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForPreTraining, pipeline

from modeling_matpac import (
    MatpacConfig,
    MatpacFeatureExtractor,
    MatpacForAudioClassification,
    MatpacForPreTraining,
    MatpacModel,
)
from modeling_matpac.convert import convert_state_dict, infer_config, load_original_state_dict
from modeling_matpac.modeling_matpac import MatpacPatchEmbeddings, get_2d_sincos_position_embeddings


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURES / "inference.safetensors")


@pytest.fixture(scope="module")
def fixture_model():
    state_dict = load_original_state_dict(FIXTURES / "inference_checkpoint.pt")
    config = infer_config(state_dict, **FIXTURE_HEADS)
    return convert_state_dict(state_dict, config, encoder_only=True).eval()


def embed(model, waveform, **kwargs):
    features = MatpacFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model(**features, **kwargs)


def test_sincos_positions_match_the_authors_tables():
    init_state = torch.load(FIXTURES / "pretraining_init_state.pt", weights_only=True)
    encoder = get_2d_sincos_position_embeddings(64, 5, 38)
    predictor = get_2d_sincos_position_embeddings(32, 5, 38)
    torch.testing.assert_close(encoder, init_state["pos_embed"][0], atol=1e-7, rtol=0)
    torch.testing.assert_close(predictor, init_state["decoder.decoder_pos_embed"][0], atol=1e-7, rtol=0)
    assert torch.count_nonzero(encoder[0]) == 0


@pytest.mark.parametrize("frames", [608, 40, 37])
def test_the_patch_product_is_the_convolution_of_the_checkpoints(frames):
    """The GPUs' product over cut patches computes the Conv2d the weights belong to, and drops a partial last patch."""
    torch.manual_seed(0)
    embeddings = MatpacPatchEmbeddings(MatpacConfig())
    values = torch.randn(3, 80, frames)
    convolved = embeddings.projection(values.unsqueeze(1)).flatten(2).transpose(1, 2)
    assert convolved.shape == (3, 5 * (frames // 16), 768)
    assert torch.equal(embeddings(values), convolved)  # on CPU, the convolution itself (the golden fixtures')
    torch.testing.assert_close(embeddings.project_patches(values), convolved, atol=5e-6, rtol=0)  # values up to 2.6


def test_only_the_cpu_keeps_the_convolution(monkeypatch):
    calls = []
    for device in ("cpu", "meta"):
        embeddings = MatpacPatchEmbeddings(MatpacConfig()).to(device)
        monkeypatch.setattr(embeddings, "project_patches", lambda values: calls.append(values.device.type) or values)
        embeddings(torch.zeros(2, 80, 608, device=device))
    assert calls == ["meta"]


@pytest.mark.parametrize("clip", ["a", "b", "c"])
def test_precise_embeddings_match_the_authors_code(fixture_model, reference, clip):
    outputs = embed(fixture_model, reference[f"{clip}.wav"], output_hidden_states=True)
    layer_results = torch.stack([*outputs.hidden_states[1:-1], outputs.last_hidden_state], dim=1)
    expected_frames = reference[f"{clip}.precise.frames.emb"]
    assert outputs.last_hidden_state.shape == expected_frames.shape
    errors = {
        "frames": (outputs.last_hidden_state - expected_frames).abs().max(),
        "pooled": (outputs.pooler_output - reference[f"{clip}.precise.pooled.emb"]).abs().max(),
        "layers": (layer_results - reference[f"{clip}.precise.frames.layer_results"]).abs().max(),
        "pooled_layers": (layer_results.mean(2) - reference[f"{clip}.precise.pooled.layer_results"]).abs().max(),
    }
    print(clip, {name: f"{error:.2e}" for name, error in errors.items()})
    assert max(errors.values()) <= 1e-4


def test_padded_batch_equals_clips_alone(fixture_model, reference):
    short, long = reference["b.wav"][0], reference["c.wav"][0]
    batch = embed(fixture_model, [short.numpy(), long.numpy()])
    for row, clip in enumerate([short, long]):
        alone = embed(fixture_model, clip.numpy())
        steps = alone.last_hidden_state.shape[1]
        assert batch.time_mask[row].sum() == steps
        torch.testing.assert_close(batch.last_hidden_state[row, :steps], alone.last_hidden_state[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.pooler_output[row], alone.pooler_output[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.pooler_output[0], reference["b.precise.pooled.emb"][0], atol=1e-4, rtol=0)


def test_a_padded_batch_exports_compiles_and_traces_to_the_eager_embeddings(tiny_config):
    """
    Before: `torch.export` and `torch.compile(fullgraph=True)` failed on a batch with an `attention_mask` (the eager
    forward groups the chunks by their valid length, read from the data). Graphs encode every chunk masked instead.
    """
    torch.manual_seed(0)
    model = MatpacModel(tiny_config).eval()
    extractor = MatpacFeatureExtractor()

    def features(*seconds):
        clips = [0.1 * torch.randn(int(16000 * length)).numpy() for length in seconds]
        return dict(extractor(clips, sampling_rate=16000, return_tensors="pt", return_attention_mask=True))

    example, other = features(3, 8.5), features(8.5, 0.5, 7, 2)  # the same frames, other lengths and batch size
    batch = torch.export.Dim("batch", max=64)
    exported = torch.export.export(model, (), example, dynamic_shapes={name: {0: batch} for name in example})
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    traced = torch.jit.trace(model, tuple(example.values()), strict=False, check_trace=False)
    with torch.no_grad():
        for inputs in (example, other):
            eager = model(**inputs)
            assert inputs["attention_mask"].float().mean() < 0.8  # padded clips, and a whole chunk of padding
            for name, graph in (("exported", exported.module()), ("compiled", compiled), ("traced", traced)):
                outputs = graph(**inputs) if name != "traced" else graph(*inputs.values())
                for key in ("last_hidden_state", "pooler_output"):
                    torch.testing.assert_close(outputs[key], eager[key], atol=1e-5, rtol=0, msg=f"{name} {key}")


def test_masked_frames_do_not_change_the_embeddings(tiny_config):
    """
    Before: the frames after a clip's end that share its last patch were read from the batch, so with a
    `padding_value` other than 0 a clip got another embedding in a batch than alone (0.64 apart here).
    """
    torch.manual_seed(0)
    model = MatpacModel(tiny_config).eval()
    clip, other = torch.randn(80, 29 * 16 + 5), torch.randn(80, 1000)
    with torch.no_grad():
        alone = model(clip[None]).pooler_output[0]
        for padding_value in (0.0, -1.0, 1.0):
            extractor_padding = torch.full((80, 1000 - clip.shape[1]), padding_value)
            values = torch.stack([torch.cat([clip, extractor_padding], 1), other])
            mask = torch.ones(2, 1000, dtype=torch.long)
            mask[0, clip.shape[1] :] = 0
            torch.testing.assert_close(model(values, attention_mask=mask).pooler_output[0], alone, atol=1e-5, rtol=0)
        holes = mask.clone()
        holes[1, 300:310] = 0  # frames masked inside a clip: whatever they hold, the output is the same
        changed = values.clone()
        changed[1, :, 300:310] += 5.0
        first, second = model(values, attention_mask=holes), model(changed, attention_mask=holes)
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("model_class", [MatpacModel, MatpacForAudioClassification])
def test_the_config_output_flags_act_as_the_call_flags(tiny_config, model_class):
    """Before: `config.return_dict=False` crashed, and `config.output_attentions` gave None past one chunk."""
    torch.manual_seed(0)
    state_dict = model_class(tiny_config).state_dict()
    model = model_class.from_pretrained(None, config=tiny_config, state_dict=state_dict, attn_implementation="eager")
    model.eval()
    values = torch.randn(2, 80, 900)  # two chunks per clip
    mask = torch.ones(2, 900, dtype=torch.long)
    mask[0, 500:] = 0
    with torch.no_grad():
        expected = model(values, attention_mask=mask, output_attentions=True)
        model.config.output_attentions = True
        from_config = model(values, attention_mask=mask)
        model.config.return_dict = False
        as_tuple = model(values, attention_mask=mask)
    assert len(from_config.attentions) == tiny_config.num_hidden_layers
    for actual, reference in zip(from_config.attentions, expected.attentions):
        assert torch.equal(actual, reference)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], expected[0])


def test_eager_and_sdpa_attention_agree(tiny_config):
    torch.manual_seed(0)
    values = torch.randn(2, 80, 700)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, 400:] = 0
    sdpa = MatpacModel(tiny_config).eval()
    eager = MatpacModel.from_pretrained(
        None, config=tiny_config, state_dict=sdpa.state_dict(), attn_implementation="eager"
    )
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    with torch.no_grad():
        expected, actual = sdpa(values, attention_mask=mask), eager.eval()(values, attention_mask=mask)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional(tiny_config):
    """Changing the last frames must change the first time step's embedding (a causal encoder would not)."""
    torch.manual_seed(0)
    model = MatpacModel(tiny_config).eval()
    values = torch.randn(1, 80, 160)
    changed = values.clone()
    changed[..., -16:] += 1.0
    with torch.no_grad():
        first, second = model(values).last_hidden_state[:, 0], model(changed).last_hidden_state[:, 0]
    assert (first - second).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    values = torch.randn(2, 80, 608)
    model = MatpacModel(tiny_config).train()
    model(values).pooler_output.square().sum().backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
    model(values).pooler_output.square().sum().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_output_layout_and_tuple_return(tiny_config):
    model = MatpacModel(tiny_config).eval()
    values = torch.randn(3, 80, 1300)
    with torch.no_grad():
        outputs = model(values, output_hidden_states=True)
        as_tuple = model(values, output_hidden_states=True, return_dict=False)
    steps = -(-1300 // 16)
    assert outputs.last_hidden_state.shape == (3, steps, 5 * 32)
    assert outputs.pooler_output.shape == (3, 5 * 32)
    assert len(outputs.hidden_states) == tiny_config.num_hidden_layers + 1
    assert all(state.shape == (3, steps, 160) for state in outputs.hidden_states)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(1))
    torch.testing.assert_close(as_tuple[0], outputs.last_hidden_state)
    # The first chunk (38 steps) of a long clip is encoded exactly as the clip's first 608 frames alone.
    with torch.no_grad():
        first_chunk = model(values[..., :608]).last_hidden_state
    torch.testing.assert_close(outputs.last_hidden_state[:, :38], first_chunk, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 64, 100), "must have shape"),
        ((80, 100), "must have shape"),
        ((2, 80, 0), "must have shape"),
        ((0, 80, 100), r"must have shape \(batch, 80, frames\), got \(0, 80, 100\)"),  # was a ZeroDivisionError
    ],
)
def test_bad_input_shapes(tiny_config, shape, message):
    with pytest.raises(ValueError, match=message):
        MatpacModel(tiny_config)(torch.zeros(shape))


def test_bad_attention_mask_shape(tiny_config):
    with pytest.raises(ValueError, match="attention_mask"):
        MatpacModel(tiny_config)(torch.zeros(1, 80, 100), attention_mask=torch.ones(1, 99))


def test_classification_losses_follow_problem_type(tiny_config):
    torch.manual_seed(0)
    values = torch.randn(4, 80, 200)
    single = MatpacForAudioClassification(MatpacConfig(**tiny_config_kwargs(num_labels=3))).eval()
    labels = torch.tensor([0, 2, 1, 2])
    outputs = single(values, labels=labels)
    torch.testing.assert_close(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, labels))
    assert single.config.problem_type == "single_label_classification"

    multi_config = MatpacConfig(**tiny_config_kwargs(num_labels=3, problem_type="multi_label_classification"))
    multi = MatpacForAudioClassification(multi_config).eval()
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    outputs = multi(values, labels=targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, targets)
    torch.testing.assert_close(outputs.loss, expected)


def test_a_bf16_classifier_computes_every_loss_in_float32():
    """Before: the single-label cross-entropy ran on bf16 logits (a bf16 loss), where the other two cast to float32."""
    torch.manual_seed(0)
    values = torch.randn(4, 80, 200)
    cases = [
        ("single_label_classification", torch.tensor([0, 2, 1, 2]), torch.nn.functional.cross_entropy),
        ("multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]),
         torch.nn.functional.binary_cross_entropy_with_logits),
        ("regression", torch.tensor([[0.5, -1.0, 2.0]]).expand(4, 3), torch.nn.functional.mse_loss),
    ]  # fmt: skip
    for problem_type, labels, loss_function in cases:
        config = MatpacConfig(**tiny_config_kwargs(num_labels=3, problem_type=problem_type))
        model = MatpacForAudioClassification(config).to(torch.bfloat16).eval()
        outputs = model(values.bfloat16(), labels=labels)
        assert outputs.logits.dtype == torch.bfloat16 and outputs.loss.dtype == torch.float32, problem_type
        labels = labels if problem_type == "single_label_classification" else labels.float()
        torch.testing.assert_close(outputs.loss, loss_function(outputs.logits.float(), labels))


@pytest.mark.parametrize(
    "num_labels, targets",
    [
        (2, torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.5, 3.0], [-0.5, 0.25]])),
        (1, torch.tensor([0.5, -1.0, 2.0, 3.0])),  # one output: `(batch,)` targets, and regression is inferred
    ],
)
def test_the_regression_loss_is_the_mean_squared_error(num_labels, targets):
    """The mean over clips and outputs, not a sum; one output's `(batch,)` targets are its `(batch, 1)` logits'."""
    torch.manual_seed(0)
    problem_type = "regression" if num_labels > 1 else None
    config = MatpacConfig(**tiny_config_kwargs(num_labels=num_labels, problem_type=problem_type))
    model = MatpacForAudioClassification(config).eval()
    values = torch.randn(4, 80, 200)
    outputs = model(values, labels=targets)
    assert model.config.problem_type == "regression"
    expected = torch.nn.functional.mse_loss(outputs.logits.reshape(targets.shape), targets)
    torch.testing.assert_close(outputs.loss, expected)
    if num_labels == 1:
        torch.testing.assert_close(model(values, labels=targets[:, None]).loss, expected)


@pytest.mark.parametrize("reload", [False, True])
def test_frozen_encoder_trains_only_the_head(tmp_path, reload):
    config = MatpacConfig(**tiny_config_kwargs(num_labels=2, freeze_encoder=True))
    model = MatpacForAudioClassification(config)
    if reload:
        model.save_pretrained(tmp_path)
        model = MatpacForAudioClassification.from_pretrained(tmp_path)
    model(torch.randn(2, 80, 200), labels=torch.tensor([0, 1])).loss.backward()
    assert all(param.grad is None for param in model.matpac.parameters())
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert {name for name, param in model.named_parameters() if param.requires_grad} == {
        "classifier.weight",
        "classifier.bias",
    }


def test_freezing_changed_after_loading_is_explicit(tmp_path):
    """Before: a flag changed alone, or parameters unfrozen alone, trained only the head without a word."""
    config = MatpacConfig(**tiny_config_kwargs(num_labels=2, freeze_encoder=True))
    MatpacForAudioClassification(config).save_pretrained(tmp_path)  # a saved probe: frozen
    values, labels = torch.randn(2, 80, 200), torch.tensor([0, 1])
    for change in ("config", "parameters"):
        model = MatpacForAudioClassification.from_pretrained(tmp_path).train()
        if change == "config":
            model.config.freeze_encoder = False
        else:
            model.requires_grad_(True)
        with pytest.raises(ValueError, match="call `model.unfreeze_encoder\\(\\)` to fine-tune the encoder"):
            model(values, labels=labels)
    model = MatpacForAudioClassification.from_pretrained(tmp_path).train()
    model.unfreeze_encoder()
    model(values, labels=labels).loss.backward()
    assert all(param.grad is not None for param in model.matpac.parameters())
    model.save_pretrained(tmp_path / "fine-tuned")
    reloaded = MatpacForAudioClassification.from_pretrained(tmp_path / "fine-tuned")
    assert not reloaded.config.freeze_encoder and all(param.requires_grad for param in reloaded.parameters())
    reloaded.freeze_encoder()
    assert reloaded.config.freeze_encoder and not any(param.requires_grad for param in reloaded.matpac.parameters())
    # Layers frozen by hand in a fine-tuned encoder train the rest, as before.
    model.matpac.encoder.layers[0].requires_grad_(False)
    model.zero_grad()
    model(values, labels=labels).loss.backward()
    assert model.matpac.encoder.layers[0].attention.qkv_proj.weight.grad is None
    assert model.matpac.embeddings.patch_embeddings.projection.weight.grad is not None


LABEL_ERRORS = [
    (
        "single_label_classification",
        torch.tensor([0, 5]),
        r"Class indices must be in \[0, 2\] \(or -100, ignored\), got \[5\]",
    ),
    ("single_label_classification", torch.tensor([-1, 0]), r"got \[-1\]"),
    ("single_label_classification", torch.tensor([0.0, 2.0]), "takes integer class indices, got torch.float32"),
    ("single_label_classification", torch.tensor([0, 1, 2]), r"takes labels of shape \(2,\) or \(2, 1\), got \(3,\)"),
    ("multi_label_classification", torch.tensor([[1, 0, -100], [0, 1, 1]]), r"targets must be in \[0, 1\]"),
    ("multi_label_classification", torch.tensor([[1.0, 0, float("nan")], [0, 1, 1]]), "must be finite"),
    ("multi_label_classification", torch.tensor([[1, 0], [0, 1]]), r"takes labels of shape \(2, 3\), got \(2, 2\)"),
    ("regression", torch.tensor([0.5, 1.0]), r"takes labels of shape \(2, 3\), got \(2,\)"),
]


@pytest.mark.parametrize("problem_type, labels, message", LABEL_ERRORS)
def test_labels_that_cannot_be_the_problem_types_are_refused_in_one_line(problem_type, labels, message):
    """Before: torch errors naming neither labels nor problem type, or a finite loss from -100 and 2 in multi-hot."""
    model = MatpacForAudioClassification(MatpacConfig(**tiny_config_kwargs(num_labels=3, problem_type=problem_type)))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 80, 100), labels=labels)


def test_labels_of_any_integer_kind_give_the_reference_losses():
    """Before: int16 indices made the config multi-label for good; int64 multi-hot failed to cast."""
    torch.manual_seed(0)
    values = torch.randn(2, 80, 100)
    model = MatpacForAudioClassification(MatpacConfig(**tiny_config_kwargs(num_labels=3))).eval()
    logits = model(values).logits
    for dtype in (torch.int16, torch.int32, torch.int64):
        loss = model(values, labels=torch.tensor([2, 0], dtype=dtype)).loss
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0])))
        assert model.config.problem_type == "single_label_classification"
    # A batch whose every label is ignored has nothing to learn: a zero loss, not NaN.
    assert model(values, labels=torch.tensor([-100, -100])).loss.item() == 0.0
    model.config.problem_type = None
    multi_hot = torch.tensor([[1, 0, 1], [0, 0, 1]])
    for targets in (multi_hot, multi_hot.bool(), multi_hot.float()):
        loss = model(values, labels=targets).loss
        torch.testing.assert_close(
            loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, multi_hot.float())
        )
    assert model.config.problem_type == "multi_label_classification"  # kept: the pipeline scores with a sigmoid


def test_the_batch_norm_head_trains_on_a_batch_of_one_clip():
    """
    Before: "Expected more than 1 value per channel when training", e.g. at the last batch of an epoch. A single clip
    has no batch statistics: it is normalised with the running ones, as in eval mode, and leaves the state as it was.
    """
    torch.manual_seed(0)
    config = MatpacConfig(**tiny_config_kwargs(num_labels=3, classifier_batch_norm=True))
    model = MatpacForAudioClassification(config).train()
    model(torch.randn(4, 80, 100), labels=torch.tensor([0, 1, 2, 0]))
    norm = model.embedding_norm
    state = {name: tensor.clone() for name, tensor in norm.state_dict().items()}
    assert set(state) == {"running_mean", "running_var", "num_batches_tracked"} and state["num_batches_tracked"] == 1
    values, labels = torch.randn(1, 80, 100), torch.tensor([1])
    loss = model(values, labels=labels).loss
    for name, tensor in norm.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # The eval-mode normalisation by hand, with the running statistics of the batch of four (not the initial 0 and 1).
    with torch.no_grad():
        embedding = model.matpac(values).pooler_output
    normalised = (embedding - state["running_mean"]) / torch.sqrt(state["running_var"] + norm.eps)
    logits = torch.nn.functional.linear(normalised, model.classifier.weight, model.classifier.bias)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(model(values).logits, model.eval()(values).logits)


def test_the_packed_bf16_weights_follow_in_place_edits_and_eval():
    """Before: an edit through `.data` went unseen by inference-mode bf16 calls; `eval()` now packs again."""
    model = MatpacForAudioClassification(MatpacConfig(**tiny_config_kwargs(num_labels=3))).eval()
    values = torch.randn(1, 80, 100)

    def logits() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(values).logits

    assert logits().abs().sum() > 0
    with torch.no_grad():
        model.classifier.bias.zero_()  # through the parameter: its version changes
        model.classifier.weight.zero_()
    assert logits().abs().sum() == 0
    model.classifier.weight.data.normal_()
    model.eval()
    assert logits().abs().sum() > 0


def test_audio_classification_pipeline_on_a_saved_directory(tmp_path, tiny_config):
    torch.manual_seed(0)
    labels = {0: "dog", 1: "rain", 2: "siren"}
    config = MatpacConfig(**tiny_config_kwargs(id2label=labels, label2id={v: k for k, v in labels.items()}))
    model = MatpacForAudioClassification(config).eval()
    model.save_pretrained(tmp_path)
    MatpacFeatureExtractor().save_pretrained(tmp_path)
    classifier = pipeline("audio-classification", model=str(tmp_path), device="cpu")
    waveform = torch.randn(24000).numpy() * 0.1
    predictions = classifier(waveform, top_k=3)
    assert sorted(prediction["label"] for prediction in predictions) == ["dog", "rain", "siren"]
    assert abs(sum(prediction["score"] for prediction in predictions) - 1) < 1e-5
    features = MatpacFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**features).logits.softmax(-1)[0]
    top = max(predictions, key=lambda prediction: prediction["score"])
    assert abs(top["score"] - probabilities.max().item()) < 1e-5
    assert labels[int(probabilities.argmax())] == top["label"]


def construction_error(**kwargs) -> str:
    """The message of the ValueError that `MatpacConfig(**kwargs)` raises."""
    with pytest.raises(ValueError) as error:
        MatpacConfig(**kwargs)
    return str(error.value)


@pytest.mark.parametrize("model_class", [MatpacModel, MatpacForPreTraining, MatpacForAudioClassification])
def test_model_refuses_a_config_made_inconsistent_by_assignment(model_class):
    """Each field is valid alone; the model raised in its first forward (heads) or trained on 0 patches (mask)."""
    for name, value in (("num_attention_heads", 5), ("mask_ratio", 0.999)):
        config = MatpacConfig(**tiny_config_kwargs())
        setattr(config, name, value)
        with pytest.raises(ValueError) as error:
            model_class(config)
        assert str(error.value) == construction_error(**tiny_config_kwargs(**{name: value}))


@pytest.mark.parametrize(
    "auto_class, override, message",
    [
        (AutoModelForPreTraining, {"mask_ratio": 0.999}, "`mask_ratio` 0.999 leaves 0 of 190 patches visible"),
        (
            AutoModel,
            {"num_attention_heads": 5},
            r"`hidden_size` \(32\) must be divisible by `num_attention_heads`",
        ),
    ],
)
def test_from_pretrained_refuses_overrides_that_break_the_config(tmp_path, auto_class, override, message):
    MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        auto_class.from_pretrained(tmp_path, **override)
    assert str(error.value) == construction_error(**tiny_config_kwargs(**override))
    loaded = auto_class.from_pretrained(tmp_path).config  # without the override it loads
    assert (loaded.num_attention_heads, loaded.mask_ratio) == (2, 0.7)


def test_bfloat16_model_takes_the_feature_extractors_float32(tmp_path):
    """`dtype=torch.bfloat16` raised "Input type (float) and bias type (c10::BFloat16) should be the same"."""
    torch.manual_seed(0)
    MatpacModel(MatpacConfig(**tiny_config_kwargs())).save_pretrained(tmp_path)
    float32_model = AutoModel.from_pretrained(tmp_path).eval()
    bfloat16_model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    waveform = (torch.randn(40000, generator=torch.Generator().manual_seed(0)) * 0.1).numpy()
    features = MatpacFeatureExtractor()([waveform, waveform[:20000]], sampling_rate=16000, return_tensors="pt")
    values, mask = features["input_values"], features["attention_mask"]
    assert values.dtype == torch.float32
    with torch.no_grad():
        pooled = bfloat16_model(values, attention_mask=mask).pooler_output
        from_bfloat16 = bfloat16_model(values.bfloat16(), attention_mask=mask).pooler_output
        from_float64 = bfloat16_model(values.double(), attention_mask=mask).pooler_output
        reference = float32_model(values, attention_mask=mask).pooler_output
        assert torch.equal(float32_model(values.double(), attention_mask=mask).pooler_output, reference)
    assert pooled.dtype == torch.bfloat16
    assert torch.equal(pooled, from_bfloat16) and torch.equal(pooled, from_float64)
    # bf16 rounds to 8 significant bits (relative 2^-9): through two blocks the pooled values (up to 2.2 here) are
    # within 1e-2 of float32's.
    torch.testing.assert_close(pooled.float(), reference, atol=3e-2, rtol=0)
