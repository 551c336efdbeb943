"""Each fast path against its slow reference: fp32 within 1e-5, bf16 within the stated tolerance."""

import copy as copy_module
import io

import pytest
import torch
from conftest import tiny_config_kwargs

from modeling_matpac import MatpacConfig, MatpacForPreTraining, MatpacModel
from modeling_matpac import modeling_matpac as modeling
from modeling_matpac.modeling_matpac import cpu_bf16_attention_forward


def pretraining_model(**kwargs) -> MatpacForPreTraining:
    torch.manual_seed(0)
    return MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs(), **kwargs)).train()


def loss_and_gradients(model, values, noise, forward=None):
    model.zero_grad()
    outputs = (model if forward is None else forward)(values, noise=noise, step=torch.tensor(3))
    outputs.loss.backward()
    gradients = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return outputs.loss.detach(), gradients


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """Within `rtol` of the largest magnitude of `expected`."""
    assert actual.shape == expected.shape, name
    assert (actual - expected).abs().max() <= rtol * expected.abs().max().clamp(min=1e-12), name


def assert_gradients_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        assert_relatively_close(actual[name], gradient, rtol, name)


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
    compiled = torch.compile(model)
    loss, gradients = loss_and_gradients(model, *batch, forward=compiled)
    assert abs(loss - reference_loss) <= 1e-5
    assert_gradients_close(gradients, reference_gradients, rtol=1e-4)
    # What a logged step reads from the compiled forward: the collapse statistics' inputs and values.
    values, noise = batch
    with torch.no_grad():
        expected = model(values, noise=noise, step=torch.tensor(3))
        actual = compiled(values, noise=noise, step=torch.tensor(3))
    for name in ("teacher_probs", "targets", "predictions"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    expected, actual = model.collapse_statistics(expected), model.collapse_statistics(actual)
    assert expected.keys() == {
        "teacher_entropy",
        "teacher_perplexity",
        "teacher_num_classes",
        "target_std",
        "prediction_std",
    }
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-5)


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


def test_cpu_ema_is_bitwise_the_foreach_update_of_accelerators():
    """On CPU the EMA runs one parameter at a time (cache-friendly); it must give the bits of the `_foreach_` ops."""
    model = pretraining_model()
    with torch.no_grad():
        for param in model.matpac.parameters():
            param.add_(torch.randn_like(param))
    expected = [param.clone() for param in model.teacher_encoder.parameters()]
    decay, _ = model.update_teachers_and_center(5, torch.zeros(model.config.head_num_prototypes), 1.0)
    assert 0 < decay < 1
    torch._foreach_mul_(expected, decay)
    torch._foreach_add_(expected, [param.detach() for param in model.matpac.encoder.parameters()], alpha=1 - decay)
    for teacher, reference in zip(model.teacher_encoder.parameters(), expected, strict=True):
        assert torch.equal(teacher, reference)


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


def key_masks(batch_size: int, seq_len: int) -> dict[str, torch.Tensor | None]:
    """No mask, SDPA's boolean mask (True = attend) and the additive mask that eager attention takes, alike."""
    attend = torch.ones(batch_size, 1, seq_len, seq_len, dtype=torch.bool)
    attend[0, ..., seq_len // 3 :] = False  # the first example attends to its first third only
    additive = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
    return {"none": None, "boolean": attend, "additive": additive}


@pytest.mark.parametrize("mask_kind", ["none", "boolean", "additive"])
def test_cpu_bf16_attention_stays_within_bf16_tolerance_of_fp32_sdpa(mask_kind):
    """The CPU bf16 path: outputs and gradients within 3e-2 of fp32 SDPA (unit-variance inputs, outputs up to ~2)."""
    torch.manual_seed(0)
    for shape in [(2, 4, 191, 32), (2, 12, 58, 64)]:
        mask = key_masks(shape[0], shape[2])[mask_kind]
        query, key, value = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        scaling = shape[-1] ** -0.5
        reference = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=key_masks(shape[0], shape[2])["boolean"] if mask is not None else None
        )
        reference.square().sum().backward()
        reference_gradients = [tensor.grad for tensor in (query, key, value)]
        inputs = [tensor.detach().bfloat16().requires_grad_() for tensor in (query, key, value)]
        fast, weights = cpu_bf16_attention_forward(None, *inputs, mask, scaling=scaling)
        fast = fast.transpose(1, 2)
        fast.float().square().sum().backward()
        assert fast.dtype == torch.bfloat16 and (fast.float() - reference).abs().max() <= 3e-2
        for tensor, gradient in zip(inputs, reference_gradients):
            assert (tensor.grad.float() - gradient).abs().max() <= 3e-2 * gradient.abs().max()
        # Without a backward to keep weights for, a masked softmax takes the fp32-output kernel: equal up to rounding.
        with torch.no_grad():
            inference, inference_weights = cpu_bf16_attention_forward(None, *inputs, mask, scaling=scaling)
        assert inference_weights.dtype == torch.bfloat16
        assert (inference_weights.float() - weights.float()).abs().max() <= 2**-13
        assert (inference.transpose(1, 2).float() - fast.float()).abs().max() <= 2**-7  # one bf16 ulp in [1, 2)
        for attention_weights in (weights, inference_weights):
            if mask is not None:  # masked keys get no weight at all
                assert torch.all(attention_weights[0, ..., shape[2] // 3 :] == 0)


def test_cpu_bf16_attention_pads_the_keys_to_the_softmax_width(monkeypatch):
    """
    191 keys (MATPAC's predictor) go through the bf16 softmax as 192, the extra key's weight exactly 0: the outputs
    and gradients are those of the unpadded ops up to bf16 rounding, and the weights come back with 191 keys. Without
    a backward (the teacher, embeddings) the same ops run: the same bits.
    """
    torch.manual_seed(0)
    lengths = []
    softmax = torch.nn.functional.softmax

    def spy(scores, *args, **kwargs):
        lengths.append(scores.shape[-1])
        return softmax(scores, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", spy)
    batch_size, num_heads, seq_len, head_dim = 2, 4, 191, 32
    inputs = [torch.randn(batch_size, num_heads, seq_len, head_dim).bfloat16().requires_grad_() for _ in range(3)]
    unpadded = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    scaling = head_dim**-0.5
    output, weights = cpu_bf16_attention_forward(None, *inputs, None, scaling=scaling)
    assert lengths == [modeling.CPU_BF16_SOFTMAX_WIDTH * 6]
    query, key, value = (tensor.flatten(0, 1) for tensor in unpadded)
    scores = torch.baddbmm(
        query.new_empty(query.shape[0], seq_len, seq_len), query, key.transpose(1, 2), beta=0, alpha=scaling
    )
    expected_weights = softmax(scores, dim=-1)
    expected = torch.bmm(expected_weights, value).view(batch_size, num_heads, seq_len, head_dim).transpose(1, 2)
    expected_weights = expected_weights.view(batch_size, num_heads, seq_len, seq_len)
    assert weights.shape == expected_weights.shape
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(batch_size, num_heads, seq_len), atol=2e-2, rtol=0)
    # Only the order of the fp32 sums differs: all but a few elements equal, the others by one bf16 ulp.
    torch.testing.assert_close(weights, expected_weights, atol=2**-16, rtol=2**-7)
    torch.testing.assert_close(output, expected, atol=2**-12, rtol=2**-7)
    assert (weights == expected_weights).float().mean() > 0.999 and (output == expected).float().mean() > 0.999
    gradient = torch.randn_like(output)
    output.backward(gradient)
    expected.backward(gradient)
    for fast, reference in zip(inputs, unpadded, strict=True):
        torch.testing.assert_close(fast.grad, reference.grad, atol=2**-10, rtol=2**-7)
        assert (fast.grad == reference.grad).float().mean() > 0.999
    with torch.no_grad():
        inference, inference_weights = cpu_bf16_attention_forward(None, *inputs, None, scaling=scaling)
    assert lengths == [modeling.CPU_BF16_SOFTMAX_WIDTH * 6] * 2
    assert torch.equal(inference, output) and torch.equal(inference_weights, weights)


def test_bf16_autocast_on_cpu_takes_the_fast_attention_path(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].dtype)
        return cpu_bf16_attention_forward(*args, **kwargs)

    monkeypatch.setattr(modeling, "cpu_bf16_attention_forward", spy)
    model = pretraining_model()
    values, noise = torch.randn(2, 80, 608), torch.rand(2, 190)
    model(values, noise=noise)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(values, noise=noise)
    layers = 2 * model.config.num_hidden_layers + model.config.predictor_num_hidden_layers  # student, teacher
    assert calls == [torch.bfloat16] * layers


def test_chunks_grouped_by_length_equal_the_masked_full_length_encoding():
    """Reference: every chunk padded to full length, padding masked out of the attention (the path for holes)."""
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs())).eval()
    values = torch.randn(3, 80, 1500)
    mask = torch.ones(3, 1500, dtype=torch.long)
    mask[0, 700:] = 0  # steps per chunk: 38, 6, 0 (padding only); row 1: 38, 25, 0; row 2: 38, 38, 18
    mask[1, 1000:] = 0
    with torch.no_grad():
        outputs = model(values, attention_mask=mask, output_hidden_states=True)
        chunks, step_mask, time_steps = model._chunk(values, mask)
        groups = model._chunk_groups(step_mask, 3, time_steps, has_padding=True)
        assert sorted(steps for _, steps, _ in groups) == [6, 18, 25, 38] and not any(masked for *_, masked in groups)
        full_length = [(slice(None), step_mask.shape[1], True)]
        reference, _ = model._encode_chunks(
            model.embeddings(chunks), step_mask, full_length, output_hidden_states=True
        )
    states = (outputs.last_hidden_state, *outputs.hidden_states)
    for state, expected in zip(states, reference):
        expected = expected.reshape(3, -1, expected.shape[-1])[:, :time_steps]
        torch.testing.assert_close(state, expected, atol=1e-5, rtol=0)
    assert torch.all(outputs.last_hidden_state[~outputs.time_mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_with_holes_is_encoded_masked(dtype):
    """In bf16 on CPU too, where the attention is `cpu_bf16_attention_forward` given SDPA's boolean mask."""
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs())).eval()
    values = torch.randn(1, 80, 608)
    mask = torch.ones(1, 608, dtype=torch.long)
    mask[0, 160:320] = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        holes = model(values, attention_mask=mask)
        changed = values.clone()
        changed[..., 160:320] += 1.0  # masked frames must not change the others' embeddings
        again = model(changed, attention_mask=mask)
    torch.testing.assert_close(holes.last_hidden_state, again.last_hidden_state, atol=1e-6, rtol=0)
    assert holes.time_mask.sum() == 38 - 10


def encode_mixed_batch(model: MatpacModel, **kwargs):
    """Three clips of 1500, 1000 and 700 frames in one padded batch: full, short and padding-only chunks."""
    torch.manual_seed(2)
    values = torch.randn(3, 80, 1500)
    mask = torch.ones(3, 1500, dtype=torch.long)
    mask[1, 1000:] = 0
    mask[2, 700:] = 0
    return model(values, attention_mask=mask, output_hidden_states=True, **kwargs)


def test_cpu_passes_of_a_few_chunks_equal_one_pass(monkeypatch):
    """The CPU's bounded passes (here one chunk each, or two) give what one pass per group gives."""
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs(), attn_implementation="eager")).eval()
    with torch.no_grad():
        reference = encode_mixed_batch(model, output_attentions=True)
        one_chunk = 1 + model.config.num_frequency_patches * model.config.num_time_patches
        for chunks_per_pass in (1, 2):
            budget = chunks_per_pass * one_chunk * model.config.intermediate_size
            monkeypatch.setattr(modeling, "CPU_ACTIVATIONS_PER_PASS", budget)
            passes = model._passes(slice(None), model.config.num_time_patches, 9, torch.device("cpu"))
            expected_sizes = [1] * 9 if chunks_per_pass == 1 else [2, 2, 2, 2, 1]
            assert [len(rows) for rows in passes] == expected_sizes
            outputs = encode_mixed_batch(model, output_attentions=True)
            fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")
            for name in fields:
                actual, expected = getattr(outputs, name), getattr(reference, name)
                actual, expected = (
                    (actual, expected) if torch.is_tensor(actual) else (torch.cat(actual), torch.cat(expected))
                )
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
            assert torch.equal(outputs.time_mask, reference.time_mask)


def test_bf16_inference_in_passes_equals_one_pass(monkeypatch):
    """Under inference autocast each pass casts the weights it uses (as autocast does): the same values as one pass."""
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs())).eval()
    one_chunk = 1 + model.config.num_frequency_patches * model.config.num_time_patches
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = encode_mixed_batch(model)
        for chunks_per_pass in (1, 2):
            budget = chunks_per_pass * one_chunk * model.config.intermediate_size
            monkeypatch.setattr(modeling, "CPU_ACTIVATIONS_PER_PASS", budget)
            outputs = encode_mixed_batch(model)
            for actual, expected in zip(
                (outputs.last_hidden_state, *outputs.hidden_states),
                (reference.last_hidden_state, *reference.hidden_states),
            ):
                assert torch.equal(actual, expected)


needs_onednn = pytest.mark.skipif(not modeling.ONEDNN_LINEAR, reason="oneDNN's linear paths are for x86 CPUs")


@needs_onednn
@pytest.mark.parametrize("shape, bias", [((37, 96), True), ((3, 41, 96), False), ((2, 5, 7, 96), True)])
def test_onednn_linear_equals_torch_linear_in_fp32(shape, bias):
    """Output and the input, weight and bias gradients within 1e-5 (relative to the largest value) of `F.linear`."""
    generator = torch.Generator().manual_seed(0)
    layer = modeling.MatpacLinear(96, 130, bias=bias)
    # A transposed input, as the attention output reaches `out_proj`: strided operands must be read correctly.
    values = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator).transpose(-1, -2)
    upstream = torch.randn(*shape[:-1], 130, generator=generator)
    results = []
    for function in (modeling.OnednnLinearFunction.apply, torch.nn.functional.linear):
        layer.zero_grad()
        inputs = values.clone().requires_grad_()
        output = function(inputs, layer.weight, layer.bias)
        output.backward(upstream)
        results.append([output, inputs.grad, layer.weight.grad] + ([layer.bias.grad] if bias else []))
    for fast, reference in zip(*results):
        assert_relatively_close(fast, reference, 1e-5)


@needs_onednn
def test_onednn_linear_composes_with_torch_func_grad():
    """`torch.func` transforms (per-example gradients, functional training loops) go through the oneDNN path too."""
    layer = modeling.MatpacLinear(16, 8)
    values = torch.randn(3, 5, 16)

    def loss(parameters):
        return torch.func.functional_call(layer, parameters, (values,)).square().sum()

    gradients = torch.func.grad(loss)(dict(layer.named_parameters()))
    torch.nn.functional.linear(values, layer.weight, layer.bias).square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert_relatively_close(gradients[name], parameter.grad, 1e-5, name)


@needs_onednn
def test_traced_and_exported_graphs_keep_torch_linear():
    """TorchScript tracing and `torch.export` (ONNX export goes through one of them) record the portable `linear`."""
    layer = modeling.MatpacLinear(16, 8).eval()
    values = torch.randn(2, 16)
    traced = torch.jit.trace(layer, values)
    exported = torch.export.export(layer, (values,))
    for graph, run in ((traced.graph, traced), (exported.graph, exported.module())):
        assert "mkldnn" not in str(graph) and "linear" in str(graph)
        assert_relatively_close(run(values), layer(values), 1e-5)


@needs_onednn
def test_fp32_pretraining_and_inference_on_cpu_take_onednn_within_1e_5(batch, monkeypatch):
    calls, onednn = [], modeling.OnednnLinearFunction

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(args[0].dtype)
            return onednn.apply(*args)

    monkeypatch.setattr(modeling, "OnednnLinearFunction", Spy)
    model = pretraining_model()
    values, noise = batch
    monkeypatch.setattr(modeling, "ONEDNN_LINEAR", False)  # the reference: torch's own products
    reference_loss, reference_gradients = loss_and_gradients(model, values, noise)
    with torch.no_grad():
        reference_embeddings = model.matpac(values).last_hidden_state
    assert calls == []
    monkeypatch.setattr(modeling, "ONEDNN_LINEAR", True)
    loss, gradients = loss_and_gradients(model, values, noise)
    # 4 linear layers in each teacher block, 3 in the student's and predictor's (fc2 is in `GeluLinearFunction`)
    layers = 4 * model.config.num_hidden_layers + 3 * (
        model.config.num_hidden_layers + model.config.predictor_num_hidden_layers
    )
    heads = 2 * (model.config.head_num_layers + 1)  # the student's and the teacher's MLP and weight-normalised layer
    assert len(calls) == layers + 2 + heads  # + the predictor's embedding and projection
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
    assert_gradients_close(gradients, reference_gradients, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        embeddings = model.matpac(values).last_hidden_state
    assert len(calls) == 4 * model.config.num_hidden_layers
    assert_relatively_close(embeddings, reference_embeddings, 1e-5)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(values, noise=noise)
    assert calls == []  # bf16 autocast keeps torch's bf16 products (oneDNN already)


@needs_onednn
def test_bf16_inference_mode_packs_each_weight_once_and_equals_autocast_bitwise():
    """Autocast's own bf16 products (outside inference mode) are the reference: packed weights give the same bits."""
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs())).eval()
    linears = [module for module in model.modules() if isinstance(module, modeling.MatpacLinear)]
    values = torch.randn(2, 80, 1400)

    def embed(mode):
        with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(values).last_hidden_state

    reference = embed(torch.no_grad)
    assert torch.equal(embed(torch.inference_mode), reference)
    packed = [linear._packed_bf16[1] for linear in linears]
    assert len(packed) == 4 * model.config.num_hidden_layers and all(
        weight.dtype == torch.bfloat16 for weight in packed
    )
    assert torch.equal(embed(torch.inference_mode), reference)
    assert all(linear._packed_bf16[1] is weight for linear, weight in zip(linears, packed))  # packed once

    with torch.no_grad():  # a weight changed in place is packed again
        model.encoder.layers[0].mlp.fc1.weight.mul_(0.5)
    changed = embed(torch.inference_mode)
    assert linears[2]._packed_bf16[1] is not packed[2] and linears[3]._packed_bf16[1] is packed[3]
    assert torch.equal(changed, embed(torch.no_grad)) and not torch.equal(changed, reference)
    assert all(linear._packed_bf16 is None for linear in linears)  # dropped by the call outside inference mode


@needs_onednn
def test_a_model_with_packed_weights_can_be_copied_and_pickled():
    """Before: after one bf16 call in inference mode, deepcopy and torch.save raised on the opaque packed weights."""
    torch.manual_seed(0)
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs())).eval()
    values = torch.randn(1, 80, 700)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(values).last_hidden_state
    assert model.encoder.layers[0].mlp.fc1._packed_bf16 is not None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy in (copy_module.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert all(
            module._packed_bf16 is None for module in copy.modules() if isinstance(module, modeling.MatpacLinear)
        )
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(copy(values).last_hidden_state, expected)


@pytest.mark.parametrize("precision", ["fp32", "fp32, torch's products", "bf16 autocast"])
def test_recomputed_gelu_gives_the_same_bits_and_keeps_one_activation_less(batch, precision, monkeypatch):
    """
    The MLP's training backward on CPU computes its GELU again (`GeluLinearFunction`): the loss and every gradient
    are bitwise those of `fc2(gelu(fc1))`, and the tensors kept for the backward shrink by exactly the GELU outputs
    of the student's and the predictor's blocks.
    """
    monkeypatch.setattr(modeling, "ONEDNN_LINEAR", modeling.ONEDNN_LINEAR and precision == "fp32")
    model = pretraining_model()
    mlps = [module for module in model.modules() if isinstance(module, modeling.MatpacMLP)]
    values, noise = batch
    results = {}
    for recompute in (False, True):
        for mlp in mlps:
            mlp.recompute_activation = recompute
        saved, held = {}, []

        def keep(tensor):
            held.append(tensor)  # no storage freed (a discarded graph's) and its address taken by another
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
                loss, gradients = loss_and_gradients(model, values, noise)
        results[recompute] = loss, gradients, sum(saved.values())

    (reference_loss, reference_gradients, reference_bytes), (loss, gradients, kept_bytes) = results.values()
    assert torch.equal(loss, reference_loss)
    assert gradients.keys() == reference_gradients.keys()
    assert all(torch.equal(gradients[name], gradient) for name, gradient in reference_gradients.items())
    config, batch_size = model.config, values.shape[0]
    student = batch_size * (config.num_visible_patches + 1) * config.intermediate_size * config.num_hidden_layers
    predictor = (
        batch_size * (config.num_patches + 1) * config.predictor_intermediate_size * config.predictor_num_hidden_layers
    )
    itemsize = 2 if precision == "bf16 autocast" else 4
    assert reference_bytes - kept_bytes == (student + predictor) * itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hypotheses", [None, 5])
def test_unit_cosine_equals_normalize_then_dot_with_closed_form_gradients(dtype, hypotheses):
    """The MATPAC++ loss's cosine: the autograd ops' forward bit for bit, their gradients within fp32 rounding."""
    generator = torch.Generator().manual_seed(0)
    shape = (3, 7, 16) if hypotheses is None else (3, 7, hypotheses, 16)
    predictions = torch.randn(shape, generator=generator).to(dtype)
    predictions[0, 0] = 0  # a zero vector and one below eps: normalize's clamp, whose gradient is linear
    predictions[0, 1] = predictions[0, 1] * 1e-13
    targets = torch.randn(shape if hypotheses is None else (3, 7, 1, 16), generator=generator)
    targets = torch.nn.functional.normalize(targets, dim=-1)
    grad = torch.randn(torch.broadcast_shapes(shape, targets.shape)[:-1], generator=generator)

    results = []
    for fast in (False, True):
        inputs = (predictions.clone().requires_grad_(), targets.clone().requires_grad_())
        if fast:
            cosine = modeling.UnitCosineFunction.apply(*inputs, modeling.NORMALIZE_EPS)
        else:
            cosine = (torch.nn.functional.normalize(inputs[0].float(), dim=-1) * inputs[1]).sum(-1)
        cosine.backward(grad)
        results.append((cosine, inputs[0].grad, inputs[1].grad))
    (reference, *reference_grads), (fast, *fast_grads) = results
    assert torch.equal(fast, reference)
    assert fast_grads[0].dtype == dtype
    for name, actual, expected in zip(("predictions", "targets"), fast_grads, reference_grads):
        # Rows far below eps have gradients near 1e12: compare each row relative to its own magnitude.
        scale = expected.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
        assert ((actual.float() - expected.float()).abs() / scale).max() <= 1e-5, name


def test_multiple_choice_pretraining_step_takes_the_closed_form_cosine_within_1e_5(batch, monkeypatch):
    """MATPAC++'s step with `UnitCosineFunction` against the same step through autograd's normalize."""
    values, noise = batch
    model = pretraining_model(predictor_num_hypotheses=5)
    fast_loss, fast_gradients = loss_and_gradients(model, values, noise)

    def reference_apply(predictions, targets, eps):
        return (torch.nn.functional.normalize(predictions.float(), dim=-1, eps=eps) * targets).sum(-1)

    monkeypatch.setattr(modeling.UnitCosineFunction, "apply", reference_apply)
    loss, gradients = loss_and_gradients(model, values, noise)
    assert torch.equal(fast_loss, loss)
    assert_gradients_close(fast_gradients, gradients, rtol=1e-5)
