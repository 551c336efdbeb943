"""Each fast path against its slow reference: fp32 within 1e-5, bf16 within the stated tolerance."""

import pytest
import torch
from conftest import tiny_config_kwargs

from modeling_matpac import MatpacConfig, MatpacForPreTraining, MatpacModel


def pretraining_model(**kwargs) -> MatpacForPreTraining:
    torch.manual_seed(0)
    return MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs(), **kwargs)).train()


def loss_and_gradients(model, values, noise, forward=None):
    model.zero_grad()
    outputs = (model if forward is None else forward)(values, noise=noise, step=torch.tensor(3))
    outputs.loss.backward()
    gradients = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return outputs.loss.detach(), gradients


def assert_gradients_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        scale = gradient.abs().max().clamp(min=1e-12)
        assert (actual[name] - gradient).abs().max() / scale <= rtol, name


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 80, 608, generator=generator), torch.rand(2, 190, generator=generator)


def test_sdpa_pretraining_step_matches_eager_attention(batch):
    sdpa = pretraining_model()
    eager = pretraining_model(attn_implementation="eager")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    eager.load_state_dict(sdpa.state_dict())
    loss, gradients = loss_and_gradients(sdpa, *batch)
    reference_loss, reference_gradients = loss_and_gradients(eager, *batch)
    assert abs(loss - reference_loss) <= 1e-5
    assert_gradients_close(gradients, reference_gradients, rtol=1e-5)


def test_compiled_pretraining_step_matches_eager(batch):
    model = pretraining_model()
    reference_loss, reference_gradients = loss_and_gradients(model, *batch)
    loss, gradients = loss_and_gradients(model, *batch, forward=torch.compile(model))
    assert abs(loss - reference_loss) <= 1e-5
    assert_gradients_close(gradients, reference_gradients, rtol=1e-4)


def test_bf16_autocast_stays_within_tolerance(batch):
    """bf16 autocast: pre-training loss within 2 %, embeddings with cosine similarity above 0.99."""
    model = pretraining_model().eval()
    values, noise = batch
    with torch.no_grad():
        reference = model(values, noise=noise).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(values, noise=noise).loss
    assert fast.dtype == torch.float32 and abs(fast - reference) / reference <= 0.02
    encoder = model.matpac
    log_mel = torch.randn(3, 80, 1000)
    with torch.inference_mode():
        reference_embedding = encoder(log_mel).pooler_output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_embedding = encoder(log_mel).pooler_output.float()
    similarity = torch.nn.functional.cosine_similarity(fast_embedding, reference_embedding, dim=-1)
    assert not torch.equal(fast_embedding, reference_embedding) and similarity.min() > 0.99


def test_fused_ema_equals_a_per_parameter_loop():
    model = pretraining_model()
    with torch.no_grad():
        for param in model.matpac.parameters():
            param.add_(torch.randn_like(param))
    teacher_before = [param.clone() for param in model.teacher_encoder.parameters()]
    decay, _ = model.update_teachers_and_center(5, torch.zeros(model.config.head_num_prototypes), 1.0)
    pairs = zip(teacher_before, model.teacher_encoder.parameters(), model.matpac.encoder.parameters())
    for before, teacher, student in pairs:
        assert torch.equal(teacher, before.mul(decay).add_(student.detach(), alpha=1 - decay))


def test_one_pass_chunked_embeddings_equal_chunk_by_chunk():
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs())).eval()
    values = torch.randn(2, 80, 1500)
    with torch.inference_mode():
        together = model(values).last_hidden_state
        padded = torch.nn.functional.pad(values, (0, 1504 - 1500))
        chunks = [model(padded[..., start : start + 608]).last_hidden_state for start in range(0, 1504, 608)]
    torch.testing.assert_close(together, torch.cat(chunks, dim=1), atol=1e-5, rtol=0)


def test_activation_checkpointing_of_the_pretraining_model_gives_the_same_gradients(batch):
    model = pretraining_model()
    loss, gradients = loss_and_gradients(model, *batch)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.predictor.layers)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, *batch)
    assert checkpointed_loss == loss
    assert_gradients_close(checkpointed_gradients, gradients, rtol=1e-6)
