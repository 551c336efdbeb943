"""PyTorch MATPAC: a ViT encoder on 16x16 log-mel patches, its pre-training model and an audio classifier."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_matpac import MatpacConfig, check_field


@dataclass
class MatpacModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, time_steps, num_frequency_patches * hidden_size)`):
        One embedding per 16-frame time step: the frequency patches of the step concatenated (lowest band first),
        after the final LayerNorm.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, num_frequency_patches * hidden_size)`):
        Mean of `last_hidden_state` over the valid time steps: the clip embedding the paper probes.
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        The patch embeddings and the raw output of every block, in the layout of `last_hidden_state`.
    attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` and eager attention):
        The attention weights of every block, `(batch_size * chunks, num_heads, tokens, tokens)`: each chunk of
        `config.num_frames` frames is its own sequence, its CLS token followed by its patches, frequency-major.
    time_mask (`torch.BoolTensor` of shape `(batch_size, time_steps)`):
        Which time steps hold audio of the clip (the others are batch padding, excluded from `pooler_output`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    time_mask: torch.BoolTensor | None = None


@dataclass
class MatpacForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        `(1 - alpha) * loss_cls + alpha * loss_pred`, each a mean over all masked patches of the batch.
    loss_pred (`torch.FloatTensor` of shape `()`):
        Mean of `2 - 2 cos(prediction, teacher latent)` over the masked patches (detached).
    loss_cls (`torch.FloatTensor` of shape `()`):
        Mean cross-entropy between the teacher's and the student's class distributions (detached).
    teacher_sum (`torch.FloatTensor` of shape `(head_num_prototypes,)`):
        Sum over the masked patches of what the centre averages (`config.center_mode`): the input of
        [`MatpacForPreTraining.update_teachers_and_center`], to be summed over micro-batches and processes first.
    teacher_count (`torch.FloatTensor` of shape `()`):
        Number of masked patches summed in `teacher_sum`.
    teacher_temperature (`torch.FloatTensor` of shape `()`):
        Teacher softmax temperature used for this step.
    teacher_probs (`torch.FloatTensor` of shape `(batch_size, num_masked_patches, head_num_prototypes)`):
        The teacher's centred and sharpened class distributions over the masked patches: the targets of `loss_cls`
        (detached).
    targets (`torch.FloatTensor` of shape `(batch_size, num_masked_patches, hidden_size)`):
        The l2-normalised teacher latents of the masked patches: the targets of `loss_pred` (detached).
    predictions (`torch.FloatTensor` of shape `(batch_size, num_masked_patches, hidden_size)`):
        The l2-normalised predictions of the masked patches (the winning head's under MATPAC++), detached.
    mcl_temperature (`torch.FloatTensor` of shape `()`, MATPAC++ only):
        Temperature of the multiple-choice schedule at this step; at or below `config.mcl_temperature_end` the
        prediction loss is the hard minimum over the heads.
    mcl_win_share (`torch.FloatTensor` of shape `(predictor_num_hypotheses,)`, MATPAC++ only):
        Fraction of the masked patches each head wins; one head winning everything means the hypotheses collapsed.
    """

    loss: torch.FloatTensor | None = None
    loss_pred: torch.FloatTensor | None = None
    loss_cls: torch.FloatTensor | None = None
    teacher_sum: torch.FloatTensor | None = None
    teacher_count: torch.FloatTensor | None = None
    teacher_temperature: torch.FloatTensor | None = None
    teacher_probs: torch.FloatTensor | None = None
    targets: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    mcl_temperature: torch.FloatTensor | None = None
    mcl_win_share: torch.FloatTensor | None = None


def get_2d_sincos_position_embeddings(embed_dim: int, grid_frequency: int, grid_time: int) -> torch.Tensor:
    """
    Fixed 2-D sin-cos positions of a (frequency, time) patch grid with a leading zero row for the CLS token, shape
    `(1 + grid_frequency * grid_time, embed_dim)`. The first half of the channels encodes the time column and the
    second half the frequency row, each as `embed_dim / 4` sines followed by as many cosines: the authors' layout.
    """
    if embed_dim % 4:
        raise ValueError(f"The sin-cos position embedding needs a width divisible by 4, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    frequency, time = torch.meshgrid(
        torch.arange(grid_frequency, dtype=torch.float64), torch.arange(grid_time, dtype=torch.float64), indexing="ij"
    )

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(time), encode(frequency)], dim=1)
    table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()


class MatpacPatchEmbeddings(nn.Module):
    """Non-overlapping 16x16 patches of the log-mel, flattened frequency-major (index = f * time_patches + t)."""

    def __init__(self, config: MatpacConfig):
        super().__init__()
        self.projection = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        # In the projection's dtype, as ViT does: the feature extractor gives float32 to models of any dtype.
        input_values = input_values.to(self.projection.weight.dtype)
        if input_values.device.type == "cpu":
            # The checkpoints' convolution: the authors' arithmetic bit for bit (their golden outputs are CPU's).
            return self.projection(input_values.unsqueeze(1)).flatten(2).transpose(1, 2)
        return self.project_patches(input_values)

    def project_patches(self, input_values: torch.Tensor) -> torch.Tensor:
        """
        The convolution as one product over the cut patches, the same sum in another order: cuDNN runs a 1-channel
        convolution slowly and with two layout conversions (3.1 ms of an H200's 102 ms eager ViT-B step).
        """
        batch_size, mel_bins, frames = input_values.shape
        size = self.projection.kernel_size[0]
        patches = input_values[:, : mel_bins - mel_bins % size, : frames - frames % size]
        patches = patches.reshape(batch_size, mel_bins // size, size, frames // size, size).transpose(2, 3)
        patches = patches.reshape(batch_size, -1, size * size)
        return nn.functional.linear(patches, self.projection.weight.flatten(1), self.projection.bias)


class MatpacEmbeddings(nn.Module):
    """Patch embeddings plus fixed positions, and the CLS token every encoder pass (student or teacher) prepends."""

    def __init__(self, config: MatpacConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = MatpacPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # Fixed sin-cos positions (the authors never train them): a buffer, saved under the key of a parameter.
        self.register_buffer("position_embeddings", torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """`(batch, mel_bins, frames)` with frames a multiple of the patch size -> `(batch, patches, hidden)`."""
        patches = self.patch_embeddings(input_values)
        time_patches = input_values.shape[-1] // self.config.patch_size
        grid = self.position_embeddings[:, 1:].reshape(
            1, self.config.num_frequency_patches, self.config.num_time_patches, -1
        )
        positions = grid[:, :, :time_patches].reshape(1, -1, grid.shape[-1])
        return patches + positions

    def prepend_cls_token(self, tokens: torch.Tensor) -> torch.Tensor:
        cls_token = (self.cls_token + self.position_embeddings[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls_token, tokens], dim=1)


# oneDNN's products on x86 CPUs. `torch.addmm` runs fp32 through MKL, which takes a slower code path on AMD processors:
# on a 2-core EPYC, a 2048^3 product runs at 218 GFLOP/s through MKL and 444 through oneDNN, with the same fp32
# accuracy (benchmarks/run.py's "matmul" rows measure both).
ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
)


def capturing_graph() -> bool:
    """Whether the code runs to be recorded as a graph (tracing, compiling, exporting) rather than eagerly."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def eager_on_cpu(tensor: torch.Tensor) -> bool:
    """
    Whether an op on `tensor` runs eagerly on CPU with data: where the CPU-only Functions below apply. Graphs (tracing,
    compiling, exporting) keep torch's portable ops.
    """
    return tensor.device.type == "cpu" and tensor.numel() > 0 and not capturing_graph()


def onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """
    `input @ weight.T (+ bias)` over the last dimension of a CPU `input` through oneDNN. Strided 2-D operands are
    read in place; `weight` may be pre-packed by `torch.ops.mkldnn._reorder_linear_weight`.
    """
    rows = input.reshape(-1, input.shape[-1])
    output = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return output.view(*input.shape[:-1], output.shape[-1])


def linear_gradients(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...], onednn: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """
    The gradients of `input @ weight.T + bias` that `needs` asks for: by oneDNN's products, or else by those of
    `addmm`'s backward in its layouts (so equal bit for bit to autograd's).
    """
    grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
    rows = input.reshape(-1, input.shape[-1])
    grad_input = grad_weight = grad_bias = None
    if needs[0]:
        grad_input = onednn_linear(grad_output, weight.t()) if onednn else grad_rows.mm(weight).view(input.shape)
    if needs[1]:
        grad_weight = onednn_linear(grad_rows.t(), rows.t()) if onednn else grad_rows.t().mm(rows)
    if needs[2]:  # False without a bias
        grad_bias = grad_rows.sum(0)
    return grad_input, grad_weight, grad_bias


class OnednnLinearFunction(torch.autograd.Function):
    """`F.linear` in fp32 on CPU with its three products (output, input and weight gradients) run by oneDNN."""

    @staticmethod
    def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn_linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs[:2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        input, weight = ctx.saved_tensors
        return linear_gradients(grad_output, input, weight, ctx.needs_input_grad, onednn=True)


class MatpacLinear(nn.Linear):
    """
    `nn.Linear` with two oneDNN paths on x86 CPUs; elsewhere (accelerators, other dtypes, tracing, compiling and
    exporting) `nn.Linear`.

    - fp32: the three products through `OnednnLinearFunction`, about twice as fast where MKL is slow.
    - bf16 autocast in inference mode, where autocast casts every weight again at every call (it caches its casts
      only outside inference mode): the layer keeps its weight cast to bf16 and packed in oneDNN's layout, bitwise
      equal and 20 % faster per product at ViT-B's shapes (10 % of an embedding call). The copy (half the fp32
      weight's memory) is re-made when the weight changes in place (an optimizer step, `load_state_dict`, any
      in-place op on the parameter), and dropped by `train()` / `eval()` and at the first call outside that mode.
      An edit through `weight.data` leaves no trace on the parameter: call `eval()` after one.
    """

    _packed_bf16: tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if ONEDNN_LINEAR and eager_on_cpu(input):
            if not torch.is_autocast_enabled("cpu"):
                if input.dtype == self.weight.dtype == torch.float32:
                    return OnednnLinearFunction.apply(input, self.weight, self.bias)
            elif (
                torch.is_inference_mode_enabled()
                and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and not parametrize.is_parametrized(self)  # a weight made at each call: nothing to keep
            ):
                return self._packed_bf16_forward(input)
        if self._packed_bf16 is not None:
            self._packed_bf16 = None
        return super().forward(input)

    def train(self, mode: bool = True) -> "MatpacLinear":
        # A new phase of use (after a training loop, whose `.data` edits keep the parameter's version) packs again.
        self._packed_bf16 = None
        return super().train(mode)

    def __getstate__(self) -> dict:
        # The packed copy is an opaque oneDNN tensor that cannot be copied or pickled; it is made again when needed.
        return {name: value for name, value in self.__dict__.items() if name != "_packed_bf16"}

    def _packed_bf16_forward(self, input: torch.Tensor) -> torch.Tensor:
        parameters = (self.weight,) if self.bias is None else (self.weight, self.bias)
        version = tuple(item for parameter in parameters for item in (parameter.data_ptr(), parameter._version))
        if self._packed_bf16 is None or self._packed_bf16[0] != version:
            weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.to(torch.bfloat16))
            self._packed_bf16 = (version, weight, None if self.bias is None else self.bias.to(torch.bfloat16))
        _, weight, bias = self._packed_bf16
        return onednn_linear(input.to(torch.bfloat16), weight, bias)


class GeluLinearFunction(torch.autograd.Function):
    """
    `linear(gelu(hidden), weight, bias)` on CPU in `weight`'s dtype, keeping `hidden` for the backward and computing
    the GELU again there: the MLP keeps one activation of its intermediate size instead of two (84 MB less at the
    peak of ViT-B's bf16 pre-training step, 168 MB in fp32) for one more GELU pass. Outputs and gradients equal
    those of `fc2(gelu(fc1))` bit for bit: the same products (oneDNN's for fp32 where `ONEDNN_LINEAR`, those of
    `addmm` and its backward otherwise, in the same layouts).
    """

    @staticmethod
    def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        activated = nn.functional.gelu(hidden).to(weight.dtype)
        if ONEDNN_LINEAR and weight.dtype == torch.float32:
            return onednn_linear(activated, weight, bias)
        return nn.functional.linear(activated, weight, bias)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs[:2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        hidden, weight = ctx.saved_tensors
        activated = nn.functional.gelu(hidden).to(weight.dtype)
        onednn = ONEDNN_LINEAR and weight.dtype == torch.float32
        grad_activated, grad_weight, grad_bias = linear_gradients(
            grad_output, activated, weight, ctx.needs_input_grad, onednn
        )
        if grad_activated is not None:
            grad_activated = torch.ops.aten.gelu_backward(grad_activated.to(hidden.dtype), hidden)
        return grad_activated, grad_weight, grad_bias


# Activations of the MLP (tokens x intermediate size) per encoder pass on CPU; see `MatpacModel._passes`.
CPU_ACTIVATIONS_PER_PASS = 2_500_000


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two matmuls around an fp32 softmax; the attention weights are what `output_attentions` records."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


# torch's bf16 softmax on CPU is fast on rows whose length is a multiple of 32 (its AVX-512 vector width) and slow on
# the others: at MATPAC's 191 and 58 keys it takes 2.1x and 3.9x its time at 192 and 64 (2 cores).
CPU_BF16_SOFTMAX_WIDTH = 32


def cpu_bf16_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Attention for bf16 on CPU, where torch's flash-attention kernel runs 2.5-5x slower than two bf16 matmuls at
    MATPAC's shapes (forward and backward). The scaling is `baddbmm`'s alpha (applied to the fp32 accumulator: one
    rounding and no extra pass over the scores, forward or backward); the mask is SDPA's (boolean, True = attend) or
    an additive one. The softmax is the bf16 kernel (fp32 inside), so that a backward keeps one bf16 copy of the
    weights and no pass writes fp32 scores. For that kernel, in eager mode and without a mask, the keys are padded
    with zero keys to a multiple of `CPU_BF16_SOFTMAX_WIDTH`, whose scores are set to -inf: their weights are exactly
    0, and the returned weights are a view without them.
    """
    batch_size, num_heads, query_len, head_dim = query.shape
    key_len = key.shape[2]
    trains = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    pads_keys = attention_mask is None and eager_on_cpu(query)
    padded_len = key_len
    if pads_keys and key_len % CPU_BF16_SOFTMAX_WIDTH:
        padded_len = -(-key_len // CPU_BF16_SOFTMAX_WIDTH) * CPU_BF16_SOFTMAX_WIDTH
        key = nn.functional.pad(key, (0, 0, 0, padded_len - key_len))
        value = nn.functional.pad(value, (0, 0, 0, padded_len - key_len))
    scores = torch.baddbmm(
        query.new_empty(batch_size * num_heads, query_len, padded_len),
        query.reshape(batch_size * num_heads, query_len, head_dim),
        key.reshape(batch_size * num_heads, padded_len, head_dim).transpose(1, 2),
        beta=0,
        alpha=scaling,
    ).view(batch_size, num_heads, query_len, padded_len)
    # In place: baddbmm's backward does not need its output. The padding keys' scores are set outside autograd: their
    # weights are 0, so the softmax's backward gives them a zero gradient anyway.
    if padded_len > key_len:
        scores.detach()[..., key_len:] = float("-inf")
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores.add_(attention_mask)
    if trains or pads_keys:
        attn_weights = nn.functional.softmax(scores, dim=-1)
    else:
        # Unpadded keys (a mask, or a graph being traced or compiled), nothing kept for a backward: the bf16 kernel is
        # slow at such widths, and the fp32-output one with a cast takes 2/3 of its time.
        attn_weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights[..., :key_len]


class MatpacAttention(nn.Module):
    """Bidirectional multi-head self-attention, fused qkv projection, dispatched through transformers' kernels."""

    def __init__(self, config: MatpacConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv_proj = MatpacLinear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.out_proj = MatpacLinear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if self.config._attn_implementation == "sdpa" and qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
            attention_interface = cpu_bf16_attention_forward  # the fast path (tests/models/test_fast_paths.py)
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients once, where three selects
        # would each zero-fill and add a gradient of the whole qkv tensor.
        query, key, value = qkv.unbind(0)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs
        )
        return self.out_proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights


class MatpacMLP(nn.Module):
    def __init__(self, config: MatpacConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = MatpacLinear(hidden_size, intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = MatpacLinear(intermediate_size, hidden_size)
        # On CPU the training backward recomputes the exact GELU (`GeluLinearFunction`) instead of keeping its output.
        self.recompute_activation = config.hidden_act == "gelu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.recompute_activation and hidden_states.requires_grad and eager_on_cpu(hidden_states):
            # In the dtype that autocast would give `fc2`, cast here so that autograd casts the gradients back.
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden_states.dtype
            bias = None if self.fc2.bias is None else self.fc2.bias.to(dtype)
            return GeluLinearFunction.apply(hidden_states, self.fc2.weight.to(dtype), bias)
        return self.fc2(self.activation(hidden_states))


class MatpacLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block, shared by the encoders and the predictor (which is narrower)."""

    def __init__(self, config: MatpacConfig, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = MatpacAttention(config, hidden_size, num_heads)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = MatpacMLP(config, hidden_size, intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_output, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + attention_output
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))


class MatpacEncoder(nn.Module):
    """The transformer blocks and final LayerNorm: all the teacher owns, and the student's trunk."""

    def __init__(self, config: MatpacConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            MatpacLayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size)
            for _ in range(config.num_hidden_layers)
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """The blocks, then the final LayerNorm (every block's raw output is what `output_hidden_states` records)."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return self.layernorm(hidden_states)


class MatpacPredictor(nn.Module):
    """
    Predicts the teacher's latents of the masked patches from the student's output (the M2D decoder): a narrower
    transformer over the visible tokens and one shared mask token at every masked position, with fixed positions.
    With several hypotheses (MATPAC++) its normalised output goes to [`MatpacMultipleChoiceHeads`] instead of its
    own projection.
    """

    def __init__(self, config: MatpacConfig):
        super().__init__()
        self.config = config
        self.embed = MatpacLinear(config.hidden_size, config.predictor_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.predictor_hidden_size))
        self.register_buffer(
            "position_embeddings", torch.zeros(1, config.num_patches + 1, config.predictor_hidden_size)
        )
        self.layers = nn.ModuleList(
            MatpacLayer(
                config,
                config.predictor_hidden_size,
                config.predictor_num_attention_heads,
                config.predictor_intermediate_size,
            )
            for _ in range(config.predictor_num_hidden_layers)
        )
        self.layernorm = nn.LayerNorm(config.predictor_hidden_size, eps=config.layer_norm_eps)
        self.projection = (
            MatpacLinear(config.predictor_hidden_size, config.hidden_size)
            if config.predictor_num_hypotheses == 1
            else nn.Identity()
        )

    def forward(
        self, student_output: torch.Tensor, ids_shuffle: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        """
        `(batch, 1 + visible, hidden)` student output -> `(batch, masked, hidden)` in the shuffle order (the width
        is the predictor's with several hypotheses).
        """
        hidden_states = self.embed(student_output)
        batch_size, num_patches = ids_shuffle.shape
        num_visible = hidden_states.shape[1] - 1
        mask_tokens = self.mask_token.expand(batch_size, num_patches - num_visible, -1)
        tokens = torch.cat([hidden_states[:, 1:], mask_tokens], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        hidden_states = torch.cat([hidden_states[:, :1], tokens], dim=1) + self.position_embeddings
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        hidden_states = self.layernorm(hidden_states)[:, 1:]
        masked_ids = ids_shuffle[:, num_visible:]
        hidden_states = torch.gather(
            hidden_states, 1, masked_ids.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
        )
        return self.projection(hidden_states)


class MatpacMultipleChoiceHeads(nn.Module):
    """MATPAC++'s hypotheses: independent linear heads, each predicting every masked patch's teacher latent."""

    def __init__(self, config: MatpacConfig):
        super().__init__()
        self.heads = nn.ModuleList(
            MatpacLinear(config.predictor_hidden_size, config.hidden_size)
            for _ in range(config.predictor_num_hypotheses)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch, masked, predictor_hidden)` -> `(batch, masked, hypotheses, hidden)`."""
        return torch.stack([head(hidden_states) for head in self.heads], dim=2)


class MatpacProjectionHead(nn.Module):
    """DINO head: an MLP to an l2-normalised bottleneck, then a weight-normalised linear layer to K class logits."""

    def __init__(self, config: MatpacConfig):
        super().__init__()
        widths = [config.hidden_size] + [config.head_hidden_size] * (config.head_num_layers - 1)
        layers = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [MatpacLinear(width_in, width_out), nn.GELU()]
        layers.append(MatpacLinear(widths[-1], config.head_bottleneck_size))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(
            MatpacLinear(config.head_bottleneck_size, config.head_num_prototypes, bias=False)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.last_layer(nn.functional.normalize(self.mlp(hidden_states), dim=-1))


class MatpacPreTrainedModel(PreTrainedModel):
    config: MatpacConfig
    base_model_prefix = "matpac"
    main_input_name = "input_values"
    input_modalities = ("audio",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MatpacLayer"]
    _supports_sdpa = True
    _can_record_outputs = {"hidden_states": MatpacLayer, "attentions": MatpacAttention}
    _input_embed_layer = "patch_embeddings"
    accepts_loss_kwargs = False

    def __init__(self, config: MatpacConfig):
        # A config changed after construction (by assignment or by `from_pretrained(..., key=value)`, which check
        # each field alone) is refused here with the error of its construction, not by a crash in a later forward.
        config.validate_architecture()
        super().__init__(config)

    # Kept because transformers' loader recreates every loaded parameter with requires_grad=True: re-freeze.
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_fixed_parameters()
        return loaded

    def freeze_fixed_parameters(self) -> None:
        """Parameters that only move outside the optimizer, or not at all: none in the encoder."""

    def _init_weights(self, module: nn.Module) -> None:
        """
        The authors' initialisation: xavier-uniform Linear layers and patch projection, fixed sin-cos positions, DINO
        heads. transformers calls this only on modules that own parameters, so the heads are set up from the root.
        """
        if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # Xavier on the (hidden, patch pixels) view, as for a Linear; the bias keeps PyTorch's Conv2d default.
            fan_in, fan_out = module.weight[0].numel(), module.weight.shape[0]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            super()._init_weights(module)  # running statistics of a fresh BatchNorm
        elif isinstance(module, (MatpacEmbeddings, MatpacPredictor)):
            token = module.cls_token if isinstance(module, MatpacEmbeddings) else module.mask_token
            init.normal_(token, std=self.config.initializer_range)
            positions = get_2d_sincos_position_embeddings(
                token.shape[-1], self.config.num_frequency_patches, self.config.num_time_patches
            )
            init.copy_(module.position_embeddings, positions.unsqueeze(0))
        elif isinstance(module, MatpacForPreTraining):
            init.zeros_(module.center)
            head = module.student_head
            for layer in head.mlp:
                if isinstance(layer, nn.Linear):
                    init.trunc_normal_(layer.weight, std=0.02)
                    init.zeros_(layer.bias)
            weight_norm_parameters = head.last_layer.parametrizations.weight
            init.ones_(weight_norm_parameters.original0)
            bound = 1 / math.sqrt(weight_norm_parameters.original1.shape[1])
            init.uniform_(weight_norm_parameters.original1, -bound, bound)
            # The teacher head starts as a copy of the student head; the teacher encoder keeps its own draws.
            for teacher, student in zip(module.teacher_head.parameters(), head.parameters()):
                init.copy_(teacher, student)


class MatpacModel(MatpacPreTrainedModel):
    """
    The MATPAC encoder for audio of any length. The log-mel is zero-padded to a multiple of the patch size and cut
    into `config.num_frames` chunks (the paper's "precise" inference); the chunks of the batch are encoded in one pass
    per chunk length (each clip's short last chunk at its own length, as the authors do) and put back in time order.
    Batch padding at the end of a clip (given by `attention_mask`, as the feature extractor pads) is left out of
    every chunk, so a clip gets the same embeddings alone or in a padded batch; padded time steps are zeros. Frames
    masked elsewhere (holes, left padding) are masked out of the attention of their chunk and keep their positions.
    Masked frames read as zeros, whatever they hold: those that share a patch with valid frames count as the padding
    of a clip alone does.
    """

    _keys_to_ignore_on_load_unexpected = [r"teacher_", r"predictor\.", r"mcl_heads\.", r"student_head\.", r"center"]

    def __init__(self, config: MatpacConfig):
        super().__init__(config)
        self.embeddings = MatpacEmbeddings(config)
        self.encoder = MatpacEncoder(config)
        self.post_init()

    def _chunk(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """
        Splits `(batch, mel, frames)` into `(batch * chunks, mel, chunk_frames)` and marks the valid time steps
        `(batch * chunks, chunk_steps)`; returns them with the number of time steps of the output.
        """
        batch_size, num_mel_bins, num_frames = input_values.shape
        patch = self.config.patch_size
        time_steps = math.ceil(num_frames / patch)
        chunk_steps = min(time_steps, self.config.num_time_patches)
        num_chunks = math.ceil(time_steps / chunk_steps)
        padded_frames = num_chunks * chunk_steps * patch

        frame_mask = torch.ones(batch_size, num_frames, dtype=torch.bool, device=input_values.device)
        if attention_mask is not None:  # masked frames read as zeros, as the padding of a clip's last patch alone
            frame_mask = attention_mask.bool()
            input_values = input_values.masked_fill(~frame_mask[:, None], 0)
        frame_mask = nn.functional.pad(frame_mask, (0, padded_frames - num_frames))
        step_mask = frame_mask.view(batch_size, num_chunks * chunk_steps, patch).any(-1)

        chunks = nn.functional.pad(input_values, (0, padded_frames - num_frames))
        chunks = chunks.view(batch_size, num_mel_bins, num_chunks, chunk_steps * patch).transpose(1, 2)
        chunks = chunks.reshape(batch_size * num_chunks, num_mel_bins, chunk_steps * patch)
        return chunks, step_mask.view(batch_size * num_chunks, chunk_steps), time_steps

    def _chunk_groups(
        self, step_mask: torch.Tensor, batch_size: int, time_steps: int, has_padding: bool
    ) -> list[tuple[slice | torch.Tensor, int, bool]]:
        """
        Groups the chunks that can be encoded together as `(rows, valid time steps, needs a mask)`. A chunk whose
        valid steps are a prefix is encoded cut to that prefix, without padding or mask: the same result as masking
        the padding (the positions are those of the first steps), less work, and the unmasked attention kernel.
        Without batch padding the groups follow from the shapes (no host synchronisation): every chunk is full but
        each clip's last. Chunks with no valid step are not encoded; a chunk with holes keeps the masked full length.
        """
        num_chunks, chunk_steps = step_mask.shape[0] // batch_size, step_mask.shape[1]
        if not has_padding:
            last_steps = time_steps - (num_chunks - 1) * chunk_steps
            if last_steps == chunk_steps:
                return [(slice(None), chunk_steps, False)]
            rows = torch.arange(step_mask.shape[0], device=step_mask.device).view(batch_size, num_chunks)
            return [(rows[:, :-1].flatten(), chunk_steps, False), (rows[:, -1], last_steps, False)]
        lengths = step_mask.sum(1)
        is_prefix = (step_mask == (torch.arange(chunk_steps, device=step_mask.device) < lengths[:, None])).all(1)
        lengths = torch.where(is_prefix, lengths, -1)  # -1: holes, encoded masked at full length
        groups = []
        for length in lengths.unique().tolist():
            if length != 0:
                rows = (lengths == length).nonzero().squeeze(1)
                groups.append((rows, chunk_steps if length < 0 else length, length < 0))
        return groups or [(slice(None), chunk_steps, True)]  # an all-padding batch: encode it masked, as it is

    def _to_time_steps(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """`(chunks, 1 + F * steps, hidden)` with the CLS token -> `(chunks, steps, F * hidden)` in time order."""
        num_frequency = self.config.num_frequency_patches
        tokens = tokens[:, 1:].unflatten(1, (num_frequency, steps))
        return tokens.transpose(1, 2).flatten(2)

    def _passes(
        self, rows: slice | torch.Tensor, steps: int, num_chunks: int, device: torch.device
    ) -> list[slice | torch.Tensor]:
        """
        Splits a group's rows into encoder passes. On CPU a pass holds about `CPU_ACTIVATIONS_PER_PASS` MLP
        activations (a few MB), which the caches and the allocator reuse from pass to pass; in one large pass every
        intermediate is fresh memory, and page faults cost more than the larger matrix products save. Accelerators
        take a group in one pass.
        """
        if device.type != "cpu":
            return [rows]
        tokens = 1 + self.config.num_frequency_patches * steps
        per_pass = max(1, CPU_ACTIVATIONS_PER_PASS // (tokens * self.config.intermediate_size))
        if (num_chunks if isinstance(rows, slice) else len(rows)) <= per_pass:
            return [rows]
        if isinstance(rows, slice):
            rows = torch.arange(num_chunks, device=device)
        return list(rows.split(per_pass))

    def _encode_chunks(
        self,
        embeddings: torch.Tensor,
        step_mask: torch.Tensor,
        groups: list[tuple[slice | torch.Tensor, int, bool]],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """
        Encodes each group of chunks, in one pass or several (`_passes`). Returns the last hidden state (then the
        recorded hidden states) as `(chunks, chunk_steps, F * hidden)` in time order, zero at the steps not encoded,
        and the recorded attentions of a single group (attention maps of different lengths do not stack).
        """
        num_frequency, chunk_steps = self.config.num_frequency_patches, step_mask.shape[1]
        passes = [
            (pass_rows, steps, masked)
            for rows, steps, masked in groups
            for pass_rows in self._passes(rows, steps, step_mask.shape[0], embeddings.device)
        ]
        outputs: list[torch.Tensor] = []
        attentions: list[tuple[torch.Tensor, ...]] = []
        for rows, steps, masked in passes:
            tokens = embeddings[rows]
            if steps < chunk_steps:  # keep the first `steps` time columns of every frequency row
                tokens = tokens.unflatten(1, (num_frequency, chunk_steps))[:, :, :steps].flatten(1, 2)
            token_mask = None
            if masked:  # padded steps hidden in all their frequency rows; the CLS token stays visible
                token_mask = nn.functional.pad(step_mask[rows].repeat(1, num_frequency), (1, 0), value=True)
            encoded = self._encode(tokens, token_mask, return_dict=True, **kwargs)
            states = [encoded.last_hidden_state, *(encoded.hidden_states or ())]
            states = [self._to_time_steps(state, steps) for state in states]
            if masked:
                states = [state.masked_fill(~step_mask[rows, :, None], 0) for state in states]
            if len(passes) == 1 and isinstance(rows, slice):  # all the chunks at once: no copy into a buffer
                return states, encoded.attentions
            if encoded.attentions is not None:
                attentions.append(encoded.attentions)
            if not outputs:
                outputs = [state.new_zeros(step_mask.shape[0], chunk_steps, state.shape[-1]) for state in states]
            for output, state in zip(outputs, states):
                output[rows, :steps] = state
        if attentions and len(groups) == 1:
            return outputs, tuple(torch.cat(maps) for maps in zip(*attentions))
        return outputs, None

    @capture_outputs(tie_last_hidden_states=False)
    def _encode(
        self,
        embeddings: torch.Tensor,
        token_mask: torch.Tensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        """Chunks' patch embeddings -> the encoder's output, CLS first; records hidden states and attentions."""
        hidden_states = self.embeddings.prepend_cls_token(embeddings)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=token_mask
        )
        return BaseModelOutput(last_hidden_state=self.encoder(hidden_states, attention_mask, **kwargs))

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MatpacModelOutput:
        r"""
        input_values (`torch.FloatTensor` of shape `(batch_size, num_mel_bins, frames)`):
            Normalised log-mel from [`MatpacFeatureExtractor`]: one clip or more, of one frame or more.
        attention_mask (`torch.LongTensor` of shape `(batch_size, frames)`, *optional*):
            1 for the frames of each clip, 0 for batch padding (at the end of the clip: elsewhere it is a hole).
        """
        if input_values.ndim != 3 or input_values.shape[1] != self.config.num_mel_bins or 0 in input_values.shape:
            raise ValueError(
                f"`input_values` must have shape (batch, {self.config.num_mel_bins}, frames), got "
                f"{tuple(input_values.shape)}."
            )
        if attention_mask is not None and attention_mask.shape != (input_values.shape[0], input_values.shape[2]):
            raise ValueError(
                f"`attention_mask` must have shape (batch, frames) = {tuple(input_values.shape[::2])}, got "
                f"{tuple(attention_mask.shape)}."
            )
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                "`output_attentions=True` needs the eager attention: load the model with attn_implementation='eager'."
            )
        batch_size = input_values.shape[0]
        chunks, step_mask, time_steps = self._chunk(input_values, attention_mask)
        # One attention map per chunk; or a graph being captured, which cannot group chunks by their data: every
        # chunk at full length, masked (the same outputs).
        if output_attentions or (capturing_graph() and attention_mask is not None):
            groups = [(slice(None), step_mask.shape[1], True)]
        else:
            groups = self._chunk_groups(step_mask, batch_size, time_steps, attention_mask is not None)
        states, attentions = self._encode_chunks(self.embeddings(chunks), step_mask, groups, **kwargs)
        last_hidden_state, *hidden_states = (
            state.reshape(batch_size, -1, state.shape[-1])[:, :time_steps] for state in states
        )

        time_mask = step_mask.view(batch_size, -1)[:, :time_steps]
        weights = time_mask.unsqueeze(-1).to(last_hidden_state.dtype)
        pooler_output = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
        return MatpacModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            hidden_states=tuple(hidden_states) if hidden_states else None,
            attentions=attentions,
            time_mask=time_mask,
        )


def check_step(step: int | torch.Tensor) -> int | torch.Tensor:
    """A step count: a non-negative number or a one-element tensor (its sign is not read: that would sync a GPU)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"`step` must be one number, got a tensor of shape {tuple(step.shape)}.")
        return step.reshape(())
    if not step >= 0:
        raise ValueError(f"`step` counts optimizer updates: it must be at least 0, got {step}.")
    return step


def linear_schedule(step: int | torch.Tensor, start: float, end: float, num_steps: int) -> float | torch.Tensor:
    """`start` at step 0, linear to `end` at `num_steps`, then `end`. A tensor step gives a tensor (for compiling)."""
    if num_steps <= 0 or start == end:
        return end
    progress = step / num_steps
    progress = progress.clamp(0.0, 1.0) if isinstance(progress, torch.Tensor) else min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


# `nn.functional.normalize`'s default eps, which the authors' losses (and the normalize calls here) use.
NORMALIZE_EPS = 1e-12


class UnitCosineFunction(torch.autograd.Function):
    """
    Cosine of each float32 `prediction` (the last dimension) with its unit-norm `target`: the forward computes
    `(normalize(prediction.float()) * target).sum(-1)`, as the authors' loss does, bit for bit, and the backward
    its gradient in closed form, `(grad / n) * (target - cosine * prediction / n)` with `n = max(|prediction|,
    eps)`. Autograd through those ops would keep two float32 copies of the predictions and take about ten passes
    over them: for MATPAC++'s 5 hypotheses per masked patch (0.5 GB per copy for ViT-B at batch 256) that backward
    cost 4.8 ms of an H100's 115 ms step. Gradients match autograd's within float32 rounding. (MATPAC's one
    prediction per patch keeps autograd's ops, and its numbers bit for bit.)
    """

    @staticmethod
    def forward(predictions: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
        predictions = predictions.float()
        norms = torch.linalg.vector_norm(predictions, dim=-1, keepdim=True)
        return (predictions / norms.clamp_min(eps) * targets).sum(-1)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        predictions, targets, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(predictions, targets, output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_cosine: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        predictions, targets, cosine = ctx.saved_tensors
        norms = torch.linalg.vector_norm(predictions, dim=-1, dtype=torch.float32)
        clamped = norms.clamp_min(ctx.eps)
        scale = grad_cosine / clamped
        grad_predictions = grad_targets = None
        if ctx.needs_input_grad[0]:
            # Below eps the norm is a constant: the cosine is linear in the prediction there.
            radial = torch.where(norms >= ctx.eps, scale * cosine / clamped, 0.0)
            grad = torch.addcmul(targets * scale.unsqueeze(-1), predictions, radial.unsqueeze(-1), value=-1)
            grad_predictions = grad.to(predictions.dtype)
        if ctx.needs_input_grad[1]:
            grad_targets = (predictions * scale.unsqueeze(-1)).sum_to_size(targets.shape)
        return grad_predictions, grad_targets, None


class MatpacForPreTraining(MatpacPreTrainedModel):
    """
    MATPAC pre-training: the student encodes the visible patches, the predictor predicts the teacher's latents of the
    masked ones (prediction loss), and the student head on those predictions learns the teacher head's centred,
    sharpened class distribution (classification loss). The teachers are EMAs of the student encoder and head; a
    training loop moves them and the centre with [`~MatpacForPreTraining.update_teachers_and_center`], once per
    optimizer step, after the backward and before `optimizer.step()`.

    With `config.predictor_num_hypotheses > 1` this is MATPAC++: several heads predict each masked patch, the
    prediction loss is annealed winner-takes-all over them ([`~MatpacForPreTraining.multiple_choice_loss`]), and the
    student head classifies the winning head's prediction.
    """

    # The EMA state: updates of (1 - decay) ~ 1e-5 vanish in bf16.
    _keep_in_fp32_modules_strict = ["teacher_encoder", "teacher_head", "center"]

    def __init__(self, config: MatpacConfig):
        super().__init__(config)
        self.matpac = MatpacModel(config)
        self.predictor = MatpacPredictor(config)
        self.mcl_heads = MatpacMultipleChoiceHeads(config) if config.predictor_num_hypotheses > 1 else None
        self.student_head = MatpacProjectionHead(config)
        self.teacher_encoder = MatpacEncoder(config)
        self.teacher_head = MatpacProjectionHead(config)
        self.register_buffer("center", torch.zeros(1, 1, config.head_num_prototypes))
        self.freeze_fixed_parameters()
        self.post_init()

    def freeze_fixed_parameters(self) -> None:
        """The teachers move only by EMA, so they are not given to the optimizer."""
        self.teacher_encoder.requires_grad_(False)
        self.teacher_head.requires_grad_(False)

    def teacher_temperature(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """Teacher temperature after `step` optimizer updates: a linear warm-up, then constant."""
        config = self.config
        return linear_schedule(
            step,
            config.teacher_temperature_warmup,
            config.teacher_temperature,
            config.teacher_temperature_warmup_steps,
        )

    def ema_decays(self, step: int, anneal_end_step: int | None = None) -> tuple[float, float]:
        """
        Decays of the teacher encoder and teacher head EMAs at `step`, each annealed to its own end value at
        `anneal_end_step`: the run's length (the authors' `max_update`), `config.ema_anneal_end_step` when not given.
        """
        config = self.config
        step = check_step(step)
        end = config.ema_anneal_end_step if anneal_end_step is None else anneal_end_step
        if anneal_end_step is not None:
            check_field("ema_anneal_end_step", anneal_end_step)
        return (
            linear_schedule(step, config.ema_decay, config.ema_end_decay, end),
            linear_schedule(step, config.head_ema_decay, config.head_ema_end_decay, end),
        )

    def mcl_temperature(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """
        Multiple-choice temperature after `step` optimizer updates: `start * decay**step`, in double precision for a
        tensor step too (in float32 the rounded decay, raised to 230,000, is 0.4 % off), then float32.
        """
        config = self.config
        if isinstance(step, torch.Tensor):
            return (config.mcl_temperature_start * config.mcl_temperature_decay ** step.double()).float()
        return config.mcl_temperature_start * config.mcl_temperature_decay**step

    def mcl_first_hard_step(self) -> float:
        """
        First update whose temperature is at or below `mcl_temperature_end` (`inf` if none), found with Python floats
        as the authors compute the temperature: comparing a tensor step with it decides the phase exactly.
        """
        config = self.config
        if config.mcl_temperature_start <= config.mcl_temperature_end:
            return 0
        if config.mcl_temperature_decay == 1:
            return math.inf
        ratio = math.log(config.mcl_temperature_end / config.mcl_temperature_start)
        step = math.ceil(ratio / math.log(config.mcl_temperature_decay))
        while step > 0 and self.mcl_temperature(step - 1) <= config.mcl_temperature_end:
            step -= 1
        while self.mcl_temperature(step) > config.mcl_temperature_end:
            step += 1
        return step

    def multiple_choice_loss(
        self, head_losses: torch.Tensor, step: int | torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Annealed winner-takes-all over the heads' losses `(batch, masked, hypotheses)`: `sum_h w_h l_h` with
        `w = softmax(-l / tau)` while the temperature is above its end value (and `step` is given), the smallest loss
        afterwards, written as one-hot weights so that a tensor step selects the phase without a Python branch. The
        weights carry no gradient. Returns the per-patch loss, the weights and the winning head of each patch.
        """
        winner = head_losses.min(dim=-1).indices
        heads = torch.arange(head_losses.shape[-1], device=head_losses.device)
        weights = (winner.unsqueeze(-1) == heads).to(head_losses.dtype)
        if step is not None:
            soft_phase = torch.as_tensor(step < self.mcl_first_hard_step(), device=head_losses.device)
            soft_weights = torch.softmax(-head_losses.detach() / self.mcl_temperature(step), dim=-1)
            weights = torch.where(soft_phase, soft_weights, weights)
        return (weights * head_losses).sum(-1), weights, winner

    def update_teachers_and_center(
        self,
        step: int,
        teacher_sum: torch.Tensor,
        teacher_count: torch.Tensor | float,
        anneal_end_step: int | None = None,
    ) -> tuple[float, float]:
        """
        The teacher side of optimizer step `step`, to call once per step after its backward and before
        `optimizer.step()` (the authors' timing, which the fixtures pin): [`~MatpacForPreTraining.update_center`], then
        [`~MatpacForPreTraining.update_teachers`]. Returns the two decays (NaN where nothing was done).
        """
        self.update_center(teacher_sum, teacher_count)
        return self.update_teachers(step, anneal_end_step)

    @torch.no_grad()
    def update_center(self, teacher_sum: torch.Tensor, teacher_count: torch.Tensor | float) -> None:
        """
        Moves the centre toward the step's teacher statistics, `C <- m C + (1 - m) teacher_sum / teacher_count`, with
        `teacher_sum` and `teacher_count` of the forward outputs summed over the step's micro-batches and processes.
        """
        if teacher_sum.numel() != self.center.numel():
            raise ValueError(
                f"`teacher_sum` must hold the {self.center.numel()} class sums of the outputs' `teacher_sum` "
                f"(summed over micro-batches), got shape {tuple(teacher_sum.shape)}."
            )
        if not isinstance(teacher_count, torch.Tensor) and not teacher_count > 0:
            raise ValueError(f"`teacher_count` must be positive (the masked patches counted), got {teacher_count}.")
        batch_mean = (teacher_sum.float() / teacher_count).view_as(self.center)
        self.center.mul_(self.config.center_momentum).add_(batch_mean, alpha=1 - self.config.center_momentum)

    @torch.no_grad()
    def update_teachers(self, step: int, anneal_end_step: int | None = None) -> tuple[float, float]:
        """
        Moves each teacher toward the student's current weights (those that produced the step's loss),
        `T <- d T + (1 - d) S`, unless its decay (`ema_decays(step, anneal_end_step)`) is 1; as in the authors' code
        there is no update at step 0. Returns the two decays (NaN where nothing was done).
        """
        step = int(check_step(step))  # the decays in double precision, as Python floats
        self.check_float32_state()
        decays = self.ema_decays(step, anneal_end_step)
        pairs = ((self.teacher_encoder, self.matpac.encoder), (self.teacher_head, self.student_head))
        applied = []
        for decay, (teacher, student) in zip(decays, pairs):
            if step == 0 or decay >= 1:
                applied.append(float("nan"))
                continue
            teacher_params = list(teacher.parameters())
            student_params = [param.detach().to(teacher_params[0].dtype) for param in student.parameters()]
            if teacher_params[0].device.type == "cpu":
                # One parameter at a time, so that the add reads what the multiply left in the cache (ViT-B: 22
                # instead of 31 ms per step on 2 cores); the same two roundings, so the same bits as `_foreach_`.
                for teacher_param, student_param in zip(teacher_params, student_params):
                    teacher_param.mul_(decay).add_(student_param, alpha=1 - decay)
            else:
                torch._foreach_mul_(teacher_params, decay)
                torch._foreach_add_(teacher_params, student_params, alpha=1 - decay)
            applied.append(decay)
        return applied[0], applied[1]

    def check_float32_state(self) -> None:
        """
        Pre-training keeps its weights in float32, reduced precision coming from autocast: the teachers' EMA moves
        them by about 1e-5 of their value per step, which rounds away in bf16 (0.8 % of the elements moved).
        """
        teacher = next(self.teacher_encoder.parameters())
        dtypes = {self.matpac.embeddings.cls_token.dtype, self.center.dtype, teacher.dtype}
        if dtypes != {torch.float32}:
            raise ValueError(
                f"Pre-training needs float32 weights, got {sorted(map(str, dtypes))}: load or keep the model in "
                "float32 (`from_pretrained(..., dtype=torch.float32)`, no `.to(torch.bfloat16)`) and train under "
                "autocast (`--bf16`)."
            )

    def random_masking(
        self, batch_size: int, device: torch.device, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample random permutation of the patches (the first `num_visible_patches` are the student's)."""
        if noise is None:
            noise = torch.rand(batch_size, self.config.num_patches, device=device)
        elif noise.shape != (batch_size, self.config.num_patches):
            raise ValueError(
                f"`noise` must have shape {(batch_size, self.config.num_patches)}, got {tuple(noise.shape)}."
            )
        ids_shuffle = torch.argsort(noise.to(device), dim=1)
        return ids_shuffle, torch.argsort(ids_shuffle, dim=1)

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        step: int | torch.Tensor | None = None,
    ) -> MatpacForPreTrainingOutput:
        r"""
        input_values (`torch.FloatTensor` of shape `(batch_size, num_mel_bins, num_frames)`):
            Normalised log-mel crops of exactly `config.num_frames` frames.
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            Masking noise; its argsort orders the patches (visible first). Random when not given.
        step (`int` or `torch.Tensor`, *optional*):
            Optimizer updates done so far, for the teacher (and MATPAC++'s multiple-choice) temperature schedules; the
            end of the schedules when not given. A 0-d tensor keeps a compiled forward from specialising on it.
        """
        config = self.config
        expected = (config.num_mel_bins, config.num_frames)
        if input_values.ndim != 3 or tuple(input_values.shape[1:]) != expected or len(input_values) == 0:
            raise ValueError(
                f"`input_values` must have shape (batch, {expected[0]}, {expected[1]}), got "
                f"{tuple(input_values.shape)}."
            )
        self.check_float32_state()
        if step is not None:
            step = check_step(step)
        if noise is not None and not isinstance(noise, torch.Tensor):
            raise ValueError(f"`noise` must be a tensor of shape (batch, num_patches), got a {type(noise).__name__}.")
        embeddings = self.matpac.embeddings(input_values)
        batch_size, _, hidden_size = embeddings.shape
        ids_shuffle, ids_restore = self.random_masking(batch_size, embeddings.device, noise)
        num_visible = config.num_visible_patches
        shuffled = torch.gather(embeddings, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, hidden_size))
        visible, masked = shuffled[:, :num_visible], shuffled[:, num_visible:]

        student_output = self.matpac.encoder(self.matpac.embeddings.prepend_cls_token(visible))
        predictions = self.predictor(student_output, ids_shuffle, ids_restore)
        with torch.no_grad():
            targets = self.teacher_encoder(self.matpac.embeddings.prepend_cls_token(masked))[:, 1:]
            teacher_logits = self.teacher_head(targets).float()

        targets_unit = nn.functional.normalize(targets.float(), dim=-1)
        if self.mcl_heads is None:
            predictions_unit = nn.functional.normalize(predictions.float(), dim=-1)
            loss_pred = 2 - 2 * (predictions_unit * targets_unit).sum(-1)
        else:
            hypotheses = self.mcl_heads(predictions)
            head_losses = 2 - 2 * UnitCosineFunction.apply(hypotheses, targets_unit.unsqueeze(2), NORMALIZE_EPS)
            loss_pred, _, winner = self.multiple_choice_loss(head_losses, step)
            # The student head classifies the winner's raw prediction, in the soft phase too (the authors' code).
            predictions = torch.take_along_dim(hypotheses, winner[..., None, None], dim=2).squeeze(2)
            predictions_unit = nn.functional.normalize(predictions.detach().float(), dim=-1)

        temperature = self.teacher_temperature(step) if step is not None else config.teacher_temperature
        teacher_probs = torch.softmax((teacher_logits - self.center) / temperature, dim=-1)
        student_log_probs = torch.log_softmax(self.student_head(predictions).float() / config.student_temperature, -1)
        loss_cls = -(teacher_probs * student_log_probs).sum(-1)
        loss = (1 - config.loss_pred_weight) * loss_cls.mean() + config.loss_pred_weight * loss_pred.mean()

        with torch.no_grad():
            mcl_statistics = {}
            if self.mcl_heads is not None:
                mcl_temperature = self.mcl_temperature(step) if step is not None else config.mcl_temperature_end
                heads = torch.arange(config.predictor_num_hypotheses, device=winner.device)
                mcl_statistics = {
                    "mcl_temperature": torch.as_tensor(mcl_temperature, dtype=torch.float32, device=loss.device),
                    "mcl_win_share": (winner.flatten().unsqueeze(-1) == heads).float().mean(0),
                }
            centred = teacher_probs if config.center_mode == "probabilities" else teacher_logits
            return MatpacForPreTrainingOutput(
                loss=loss,
                loss_pred=loss_pred.mean().detach(),
                loss_cls=loss_cls.mean().detach(),
                teacher_sum=centred.sum(dim=(0, 1)),
                teacher_count=torch.full((), float(loss_cls.numel()), device=loss.device),
                teacher_temperature=torch.as_tensor(temperature, dtype=torch.float32, device=loss.device),
                teacher_probs=teacher_probs,
                targets=targets_unit,
                predictions=predictions_unit.detach(),
                **mcl_statistics,
            )

    @staticmethod
    @torch.compiler.disable
    @torch.no_grad()
    def collapse_statistics(outputs: MatpacForPreTrainingOutput) -> dict[str, torch.Tensor]:
        """
        Signs of collapse in a step's outputs, to be logged: the teacher's mean per-patch entropy (near 0:
        over-sharpened targets), the perplexity of its batch-mean distribution (about how many classes are in use),
        its number of distinct argmax classes (1: collapse), and the spreads over the masked patches of the unit
        targets and predictions, averaged over channels (near 0: collapsed representations).

        A function of the outputs rather than of the forward, so that a compiled forward is the same graph on every
        step, logged or not. It runs eagerly even inside a compiled function: fused into the loss's kernels,
        Inductor's Triton code for it failed to compile on an H200 (torch 2.11, `NameError` in the generated kernel).
        """
        teacher_probs = outputs.teacher_probs
        mean_probs = teacher_probs.mean(dim=(0, 1))
        return {
            "teacher_entropy": -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-12))).sum(-1).mean(),
            "teacher_perplexity": torch.exp(-(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum()),
            "teacher_num_classes": torch.zeros_like(mean_probs)
            .index_fill_(0, teacher_probs.argmax(-1).flatten(), 1)
            .sum(),
            "target_std": outputs.targets.flatten(0, 1).std(0).mean(),
            "prediction_std": outputs.predictions.flatten(0, 1).std(0).mean(),
        }


class MatpacForAudioClassification(MatpacPreTrainedModel):
    """
    A linear layer on the clip embedding: the paper's linear probe, a fine-tuned classifier, or the authors' AudioSet
    tagger, which averages the frequency patches (`config.classifier_pooling`) and standardises the embedding with a
    non-affine BatchNorm (`config.classifier_batch_norm`) before the layer.
    """

    def __init__(self, config: MatpacConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.matpac = MatpacModel(config)
        pooled_size = config.hidden_size if config.classifier_pooling == "frequency_mean" else config.embedding_size
        self.embedding_norm = nn.BatchNorm1d(pooled_size, affine=False) if config.classifier_batch_norm else None
        self.classifier = MatpacLinear(pooled_size, config.num_labels)
        self.freeze_fixed_parameters()
        self.post_init()

    def freeze_fixed_parameters(self) -> None:
        """With `config.freeze_encoder` only the linear head trains (the paper's probe)."""
        if self.config.freeze_encoder:
            self.matpac.requires_grad_(False)

    def freeze_encoder(self) -> None:
        """Trains only the head from now on (`config.freeze_encoder`, kept when saved). Call before the optimizer."""
        self.config.freeze_encoder = True
        self.matpac.requires_grad_(False)

    def unfreeze_encoder(self) -> None:
        """Fine-tunes the encoder with the head from now on, also a loaded probe's. Call before the optimizer."""
        self.config.freeze_encoder = False
        self.matpac.requires_grad_(True)

    def _encoder_trains(self) -> bool:
        """
        Whether the encoder's parameters take gradients. In training, `config.freeze_encoder` must say the same: a
        flag changed alone, or parameters unfrozen alone, would leave the encoder untrained without a word.
        """
        trains = any(parameter.requires_grad for parameter in self.matpac.parameters())
        if self.training and trains == self.config.freeze_encoder:
            state = "some require gradients" if trains else "none requires gradients"
            raise ValueError(
                f"`config.freeze_encoder` is {self.config.freeze_encoder}, but of the encoder's parameters {state}: "
                "call `model.unfreeze_encoder()` to fine-tune the encoder or `model.freeze_encoder()` to train only "
                "the head, before the optimizer is built."
            )
        return trains

    def classification_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """
        The loss of `config.problem_type`: cross-entropy over class indices (-100 ignored), binary cross-entropy over
        multi-hot targets (bool, integer or float), or mean squared error. Unset, the type is read from the labels
        (one output: regression; `(batch, num_labels)` targets: multi-label; else class indices) and kept in the
        config, so that the pipeline scores as the model was trained. Labels that cannot be of that type are refused
        in one line.
        """
        batch_size, num_labels = logits.shape
        problem_type = self.config.problem_type
        if problem_type is None:
            if num_labels == 1:
                problem_type = "regression"
            elif labels.shape == (batch_size, num_labels):
                problem_type = "multi_label_classification"
            else:
                problem_type = "single_label_classification"
        expected = {
            "single_label_classification": [(batch_size,), (batch_size, 1)],
            "multi_label_classification": [(batch_size, num_labels)],
            "regression": [(batch_size, num_labels)] + ([(batch_size,)] if num_labels == 1 else []),
        }[problem_type]
        if tuple(labels.shape) not in expected:
            raise ValueError(
                f"{problem_type} with {num_labels} labels takes labels of shape {' or '.join(map(str, expected))}, "
                f"got {tuple(labels.shape)}."
            )
        if problem_type == "single_label_classification":
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(
                    f"single_label_classification takes integer class indices, got {labels.dtype} labels: cast them "
                    "to int64, or set `problem_type` for multi-hot targets or regression."
                )
            labels = labels.reshape(-1).long()
            kept = labels != -100
            outside = kept & ((labels < 0) | (labels >= num_labels))
            if outside.any():
                raise ValueError(
                    f"Class indices must be in [0, {num_labels - 1}] (or -100, ignored), got "
                    f"{labels[outside].unique().tolist()[:5]}."
                )
            loss = nn.functional.cross_entropy(logits.float(), labels) if kept.any() else logits.float().sum() * 0
        else:
            labels = labels.to(torch.float32).reshape(logits.shape)
            if not torch.isfinite(labels).all():
                raise ValueError(f"{problem_type} labels must be finite, got NaN or infinite values.")
            if problem_type == "regression":
                loss = nn.functional.mse_loss(logits.float(), labels)
            else:
                if ((labels < 0) | (labels > 1)).any():
                    raise ValueError("multi_label_classification targets must be in [0, 1] (multi-hot).")
                loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        self.config.problem_type = problem_type
        return loss

    def clip_embedding(self, outputs: MatpacModelOutput) -> torch.Tensor:
        """The pooled embedding the head is for: `pooler_output`, or its mean over the frequency patches."""
        pooled = outputs.pooler_output
        if self.config.classifier_pooling == "frequency_mean":
            # The time mean of the per-step frequency means is the frequency mean of the time mean.
            pooled = pooled.view(pooled.shape[0], self.config.num_frequency_patches, -1).mean(1)
        return pooled

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, or a tensor `(batch_size, num_labels)`):
            Class indices for single-label tasks (cross-entropy, -100 ignored) or multi-hot targets for multi-label
            tasks (binary cross-entropy), following `config.problem_type`; see [`classification_loss`].
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._encoder_trains()):
            outputs = self.matpac(input_values, attention_mask=attention_mask, return_dict=True, **kwargs)
        embedding = self.clip_embedding(outputs)
        norm = self.embedding_norm
        if norm is not None and self.training and len(embedding) == 1:  # no batch statistics from a single clip
            embedding = nn.functional.batch_norm(embedding, norm.running_mean, norm.running_var, eps=norm.eps)
        elif norm is not None:
            embedding = norm(embedding)
        logits = self.classifier(embedding)
        loss = None
        if labels is not None:
            loss = self.classification_loss(labels, logits)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["MatpacPreTrainedModel", "MatpacModel", "MatpacForPreTraining", "MatpacForAudioClassification"]
