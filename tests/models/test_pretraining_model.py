import copy
import math

import pytest
import torch
from conftest import FIXTURE_HEADS, FIXTURE_SCHEDULES, FIXTURES, tiny_config_kwargs
from safetensors.torch import load_file

from modeling_matpac import MatpacConfig, MatpacForPreTraining
from modeling_matpac.convert import convert_state_dict, infer_config, load_original_state_dict, rename_key
from modeling_matpac.modeling_matpac import MatpacForPreTrainingOutput


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURES / "pretraining.safetensors")


def fixture_model(**overrides) -> MatpacForPreTraining:
    original = load_original_state_dict(FIXTURES / "pretraining_init_state.pt")
    config = infer_config(original, **FIXTURE_HEADS, **FIXTURE_SCHEDULES, **overrides)
    return convert_state_dict(original, config, encoder_only=False).train()


def run_authors_loop(model, reference, steps=4):
    """The fixture's procedure: forward, backward, teacher and centre updates, SGD(lr=0.05)."""
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.05)
    records = []
    for step in range(steps):
        center_used = model.center.clone()
        outputs = model(reference["input.logmel_norm"], noise=reference[f"step{step}.noise"], step=step)
        outputs.loss.backward()
        decays = model.update_teachers_and_center(step, outputs.teacher_sum, outputs.teacher_count)
        optimizer.step()
        optimizer.zero_grad()
        records.append((outputs, decays, center_used, model.center.clone()))
    return records


def test_four_training_steps_reproduce_the_authors_code(reference):
    model = fixture_model()
    errors = {"loss": 0.0, "loss_cls": 0.0, "loss_pred": 0.0, "center": 0.0, "state": 0.0}
    for step, (outputs, decays, center_used, center_after) in enumerate(run_authors_loop(model, reference)):
        errors["loss"] = max(errors["loss"], abs(outputs.loss.item() - reference[f"step{step}.loss_total"].item()))
        for name in ("loss_cls", "loss_pred"):
            expected = reference[f"step{step}.{name}"].mean().item()
            errors[name] = max(errors[name], abs(getattr(outputs, name).item() - expected))
        assert outputs.teacher_temperature.item() == pytest.approx(reference[f"step{step}.teacher_temp"].item())
        assert outputs.teacher_count.item() == reference[f"step{step}.sample_size"].item() == 399
        errors["center"] = max(
            errors["center"],
            (center_used - reference[f"step{step}.center_used"]).abs().max().item(),
            (center_after - reference[f"step{step}.center_effective_after"]).abs().max().item(),
        )
        for decay, name in zip(decays, ("encoder", "head")):
            if reference[f"step{step}.ema_{name}_applied"].item():
                assert decay == pytest.approx(reference[f"step{step}.ema_{name}_decay"].item(), abs=1e-6)
            else:
                assert math.isnan(decay)
    state = model.state_dict()
    for key, tensor in reference.items():
        if key.startswith("final.") and key != "final.cls_head_loss.center":
            errors["state"] = max(
                errors["state"], (state[rename_key(key[len("final.") :])] - tensor).abs().max().item()
            )
    print({name: f"{error:.2e}" for name, error in errors.items()})
    assert max(errors["loss"], errors["loss_cls"], errors["loss_pred"]) <= 1e-4
    assert errors["center"] <= 1e-6
    assert errors["state"] <= 1e-5
    # The centre sums 1 - 0.9^n after n updates, since every teacher distribution sums to one.
    assert model.center.sum().item() == pytest.approx(1 - 0.9**4, abs=1e-5)


def test_per_patch_losses_and_step0_intermediates_match(reference):
    """Per masked patch, in the fixture's order, from the outputs of the predictor, the teacher and both heads."""
    model = fixture_model()
    captured = {}
    for name in ("predictor", "teacher_encoder", "student_head", "teacher_head"):
        module = getattr(model, name)
        module.register_forward_hook(lambda _, __, output, name=name: captured.__setitem__(name, output))
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.05)
    errors = {}
    for step in range(4):
        center = model.center.clone()
        outputs = model(reference["input.logmel_norm"], noise=reference[f"step{step}.noise"], step=step)
        predictions, targets = captured["predictor"], captured["teacher_encoder"][:, 1:]
        teacher_probs = torch.softmax((captured["teacher_head"] - center) / outputs.teacher_temperature, dim=-1)
        student_log_probs = torch.log_softmax(captured["student_head"] / 0.1, dim=-1)
        per_patch = {
            "loss_cls": -(teacher_probs * student_log_probs).sum(-1).flatten(),
            "loss_pred": (2 - 2 * torch.nn.functional.cosine_similarity(predictions, targets, dim=-1)).flatten(),
        }
        if step == 0:
            per_patch.update(
                z_hat_m=predictions,
                z_m=targets,
                teacher_logits=captured["teacher_head"],
                student_logits=captured["student_head"],
                p_m=teacher_probs,
            )
        for name, value in per_patch.items():
            error = (value.detach() - reference[f"step{step}.{name}"]).abs().max().item()
            errors[name] = max(errors.get(name, 0.0), error)
        outputs.loss.backward()
        model.update_teachers_and_center(step, outputs.teacher_sum, outputs.teacher_count)
        optimizer.step()
        optimizer.zero_grad()
    print({name: f"{error:.2e}" for name, error in errors.items()})
    assert max(errors.values()) <= 1e-4


def test_updating_teachers_after_the_optimizer_step_is_one_step_off(reference):
    """The fixture pins the authors' timing: an EMA toward the already-updated student fails it."""
    model = fixture_model()
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.05)
    for step in range(3):
        outputs = model(reference["input.logmel_norm"], noise=reference[f"step{step}.noise"], step=step)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teachers_and_center(step, outputs.teacher_sum, outputs.teacher_count)
    assert abs(outputs.loss_cls.item() - reference["step2.loss_cls"].mean().item()) > 1e-4


def test_paper_mode_centres_the_logits(reference):
    model = fixture_model(center_mode="logits")
    noise, values = reference["step0.noise"], reference["input.logmel_norm"]
    with torch.no_grad():
        outputs = model(values, noise=noise, step=0)
    teacher_logits = reference["step0.teacher_logits"]
    torch.testing.assert_close(outputs.teacher_sum, teacher_logits.sum(dim=(0, 1)), atol=1e-4, rtol=1e-5)
    model.update_teachers_and_center(0, outputs.teacher_sum, outputs.teacher_count)
    torch.testing.assert_close(model.center.flatten(), 0.1 * teacher_logits.mean(dim=(0, 1)), atol=1e-6, rtol=1e-5)
    # With a non-zero centre the step's teacher targets use it: the loss changes, the prediction loss does not.
    with torch.no_grad():
        shifted = model(values, noise=noise, step=0)
    assert abs(shifted.loss_cls - outputs.loss_cls) > 1e-4
    torch.testing.assert_close(shifted.loss_pred, outputs.loss_pred)


def test_schedules():
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs(ema_anneal_end_step=100)))
    assert model.teacher_temperature(0) == pytest.approx(0.04)
    assert model.teacher_temperature(9827 // 2) == pytest.approx(0.055, abs=1e-5)
    assert model.teacher_temperature(10**6) == 0.07
    assert model.ema_decays(0) == (0.99995, 0.998)
    assert model.ema_decays(50) == (pytest.approx(0.99997), pytest.approx(0.999))
    # Past the end each EMA keeps its own end decay (the authors' code gave the head the encoder's).
    assert model.ema_decays(100) == (0.99999, 1.0)
    # A training loop passes its own length; the config keeps its value.
    assert model.ema_decays(50, anneal_end_step=200) == (pytest.approx(0.99996), pytest.approx(0.9985))
    assert model.config.ema_anneal_end_step == 100
    before = [param.clone() for param in model.teacher_head.parameters()]
    assert math.isnan(model.update_teachers_and_center(100, torch.zeros(24), 1.0)[1])
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher_head.parameters()))


def test_fresh_model_initialisation():
    torch.manual_seed(0)
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs()))
    for teacher, student in zip(model.teacher_head.parameters(), model.student_head.parameters()):
        assert torch.equal(teacher, student)
    student_qkv = model.matpac.encoder.layers[0].attention.qkv_proj.weight
    assert not torch.equal(model.teacher_encoder.layers[0].attention.qkv_proj.weight, student_qkv)
    assert torch.count_nonzero(model.center) == 0
    assert torch.all(model.student_head.last_layer.parametrizations.weight.original0 == 1)
    bias = model.matpac.embeddings.patch_embeddings.projection.bias
    assert bias.abs().max() <= 1 / 16 and bias.abs().max() > 0
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert "student_head.last_layer.parametrizations.weight.original0" in trainable
    assert not any(name.startswith("teacher_") or "position_embeddings" in name for name in trainable)


def test_masking_is_deterministic_with_noise_and_checks_shapes():
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).eval()
    values, noise = torch.randn(2, 80, 608), torch.rand(2, 190)
    with torch.no_grad():
        first, second = model(values, noise=noise), model(values, noise=noise)
        other = model(values, noise=torch.rand(2, 190))
    assert first.loss == second.loss and first.loss != other.loss
    with pytest.raises(ValueError, match="noise"):
        model(values, noise=torch.rand(2, 189))
    with pytest.raises(ValueError, match=r"\(batch, 80, 608\)"):
        model(torch.randn(2, 80, 600))


def test_collapse_statistics_are_consistent():
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).eval()
    values = torch.randn(3, 80, 608)
    with torch.no_grad():
        outputs = model(values)
    statistics = model.collapse_statistics(outputs)
    prototypes = model.config.head_num_prototypes
    assert 0 <= statistics["teacher_entropy"] <= math.log(prototypes) + 1e-5
    assert 1 <= statistics["teacher_perplexity"] <= prototypes + 1e-3
    assert 1 <= statistics["teacher_num_classes"] <= prototypes
    # The statistics' inputs are the loss's: the classification targets and the unit latents of `loss_pred`.
    torch.testing.assert_close(outputs.teacher_probs.sum(-1), torch.ones(3, 133))
    cosine = (outputs.predictions * outputs.targets).sum(-1)
    torch.testing.assert_close(outputs.loss_pred, (2 - 2 * cosine).mean())
    assert 0 < statistics["target_std"] < 1 and 0 < statistics["prediction_std"] < 1
    assert outputs.teacher_sum.sum().item() == pytest.approx(outputs.teacher_count.item(), rel=1e-5)
    torch.testing.assert_close(outputs.loss, 0.5 * outputs.loss_cls + 0.5 * outputs.loss_pred)


def test_collapse_statistics_of_a_hand_made_output():
    """
    Golden values derived by hand, where the test above only checks ranges, which a wrong formula can keep. The three
    masked patches come as one clip or as three clips of one patch: the statistics pool clips and patches alike.
    """
    # One-hot teacher, two patches on class 1 and one on class 0: every patch's entropy is 0; the batch-mean
    # distribution is [1/3, 2/3, 0, 0], of entropy ln 3 - (2/3) ln 2, so a perplexity of 3 / 2 ** (2/3) = 1.88988
    # (the mean of the per-patch perplexities would be 1); 2 argmax classes.
    one_hot = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    # Every patch [1/2, 1/4, 1/4, 0]: entropy (1/2) ln 2 + 2 (1/4) ln 4 = 1.5 ln 2, a perplexity of 2 ** 1.5; 1 class.
    soft = torch.tensor([[0.5, 0.25, 0.25, 0.0]]).expand(3, 4)
    # Unit latents. A channel holding a, a, b over the three patches has the (unbiased) std |a - b| / sqrt(3): the
    # targets' channels (1, 0, 1 and 0, 1, 0) both give 1 / sqrt(3) = 0.57735 (a std over each patch's two channels
    # would give 0.70711); the predictions' (0.6, 0.6, 0 and 0.8, 0.8, 1) give 0.6 / sqrt(3) and 0.2 / sqrt(3), of
    # mean 0.4 / sqrt(3) = 0.23094.
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    predictions = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]])
    stds = {"target_std": 1 / math.sqrt(3), "prediction_std": 0.4 / math.sqrt(3)}
    cases = [
        (one_hot, {"teacher_entropy": 0.0, "teacher_perplexity": 3 / 2 ** (2 / 3), "teacher_num_classes": 2, **stds}),
        (soft, {"teacher_entropy": 1.5 * math.log(2), "teacher_perplexity": 2**1.5, "teacher_num_classes": 1, **stds}),
    ]
    for teacher_probs, expected in cases:
        for shape in [(1, 3, -1), (3, 1, -1)]:
            outputs = MatpacForPreTrainingOutput(
                teacher_probs=teacher_probs.reshape(shape),
                targets=targets.reshape(shape),
                predictions=predictions.reshape(shape),
            )
            statistics = MatpacForPreTraining.collapse_statistics(outputs)
            assert {name: value.item() for name, value in statistics.items()} == pytest.approx(expected, abs=1e-6)


def test_pretraining_model_from_an_encoder_checkpoint_initialises_the_rest(tmp_path):
    """Missing modules are created on the meta device by from_pretrained: each must get a real initialisation."""
    torch.manual_seed(0)
    MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).matpac.save_pretrained(tmp_path)
    model = MatpacForPreTraining.from_pretrained(tmp_path)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    assert torch.all(model.student_head.last_layer.parametrizations.weight.original0 == 1)
    assert model.student_head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    for teacher, student in zip(model.teacher_head.parameters(), model.student_head.parameters()):
        assert torch.equal(teacher, student)
    assert torch.count_nonzero(model.center) == 0
    positions = model.predictor.position_embeddings[0]
    torch.testing.assert_close(positions[1:, 0], torch.arange(38.0).repeat(5).sin())


def test_forward_compiles_without_graph_breaks_and_tensor_steps_match_int_steps():
    torch.manual_seed(0)
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs(teacher_temperature_warmup_steps=4))).eval()
    values, noise = torch.randn(2, 80, 608), torch.rand(2, 190)

    def loss(step):
        return model(values, noise=noise, step=step).loss

    explanation = torch._dynamo.explain(loss)(torch.tensor(1))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    with torch.no_grad():
        for step in (0, 2, 7):
            tensor_outputs = model(values, noise=noise, step=torch.tensor(step))
            int_outputs = model(values, noise=noise, step=step)
            torch.testing.assert_close(tensor_outputs.loss, int_outputs.loss, atol=1e-6, rtol=0)
            assert tensor_outputs.teacher_temperature.item() == pytest.approx(model.teacher_temperature(step))


@pytest.mark.parametrize("shape", [(2, 80, 100), (0, 80, 608)])
def test_input_of_another_size_or_no_clip_is_refused(shape):
    """An empty batch was a reshape error deep in the attention."""
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs()))
    with pytest.raises(ValueError, match=rf"must have shape \(batch, 80, 608\), got \({', '.join(map(str, shape))}\)"):
        model(torch.zeros(shape))


def test_the_centre_and_teacher_updates_are_the_two_halves_of_the_step_call():
    """A loop may call `update_center` and `update_teachers` itself (the side-by-side instrument does): same state."""
    torch.manual_seed(0)
    combined = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).train()
    halves = copy.deepcopy(combined)
    values = torch.randn(2, combined.config.num_mel_bins, combined.config.num_frames)
    noise = torch.rand(2, combined.config.num_patches)
    outputs = {}
    for name, model in (("combined", combined), ("halves", halves)):
        outputs[name] = model(values, noise=noise, step=3)
        outputs[name].loss.backward()
    decays = combined.update_teachers_and_center(3, outputs["combined"].teacher_sum, outputs["combined"].teacher_count)

    teachers_before = [param.clone() for param in halves.teacher_encoder.parameters()]
    halves.update_center(outputs["halves"].teacher_sum, outputs["halves"].teacher_count)
    assert torch.count_nonzero(halves.center) > 0
    assert all(torch.equal(a, b) for a, b in zip(teachers_before, halves.teacher_encoder.parameters()))
    center = halves.center.clone()
    assert halves.update_teachers(3) == decays
    assert torch.equal(halves.center, center)
    assert not all(torch.equal(a, b) for a, b in zip(teachers_before, halves.teacher_encoder.parameters()))
    for (name, a), b in zip(combined.state_dict().items(), halves.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_model_cast_to_reduced_precision_is_refused_for_pre_training():
    """Before: `.to(torch.bfloat16)` trained, and one EMA update moved 0.8 % of the teacher's elements (fp32: 95 %)."""
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).to(torch.bfloat16)
    values = torch.randn(2, 80, 608, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"Pre-training needs float32 weights, got \['torch.bfloat16'\]"):
        model(values)
    with pytest.raises(ValueError, match="Pre-training needs float32 weights"):
        model.update_teachers(3)


def test_the_forward_runs_under_inference_mode_and_bf16_autocast():
    """Before: "Inference tensors do not track version counter", from the weight-normalised head's packed path."""
    torch.manual_seed(0)
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())).eval()
    values, noise = torch.randn(2, 80, 608), torch.rand(2, 190)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(values, noise=noise, step=3).loss
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(values, noise=noise, step=3).loss
    # Bitwise equal here: the packed path is documented as bitwise equal to autocast's. float32's default tolerance
    # rather than equality, so that another CPU's kernels do not make it flaky; atol=2e-2 let a 0.5 % drift through.
    torch.testing.assert_close(loss, expected)


def test_a_tensor_step_gives_the_schedules_of_an_int_step():
    """Before: a tensor step raised the float32-rounded decay to the step: 0.44 % off at 230,000 updates."""
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs(predictor_num_hypotheses=5)))
    for step in (0, 1000, 100_000, 230_000):
        expected = model.mcl_temperature(step)
        assert model.mcl_temperature(torch.tensor(step)).item() == pytest.approx(expected, rel=1e-6)
    decays = model.update_teachers(torch.tensor(1000))
    assert decays == model.update_teachers(1000) and all(type(decay) is float for decay in decays)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda model: model(torch.randn(2, 80, 608), step=-20000), "`step` counts optimizer updates: .* got -20000"),
        (lambda model: model(torch.randn(2, 80, 608), step=torch.tensor([3, 4])), r"`step` must be one number"),
        (lambda model: model(torch.randn(2, 80, 608), noise=[0.5] * 190), "`noise` must be a tensor"),
        (lambda model: model.update_teachers(-3), "must be at least 0, got -3"),
        (lambda model: model.ema_decays(5, anneal_end_step=0), "`ema_anneal_end_step` must be positive, got 0"),
        (lambda model: model.update_center(torch.ones(24), 0), "`teacher_count` must be positive"),
        (lambda model: model.update_center(torch.ones(133, 24), 133), r"must hold the 24 class sums .*\(133, 24\)"),
    ],
)
def test_steps_counts_and_noise_that_cannot_be_are_refused(call, message):
    """Before: a negative temperature, decays below their start, an infinite centre, or torch's shape errors."""
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs()))
    center = model.center.clone()
    with pytest.raises(ValueError, match=message):
        call(model)
    assert torch.equal(model.center, center)
