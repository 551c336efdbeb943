"""MATPAC model configuration."""

import math

import numpy as np
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


CENTER_MODES = ("probabilities", "logits")
CLASSIFIER_POOLINGS = ("concatenate", "frequency_mean")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
# Every MATPAC class, so that a saved directory's remote code loads any of them (saving lists only the saved class).
AUTO_MAP = {
    "AutoConfig": "configuration_matpac.MatpacConfig",
    "AutoModel": "modeling_matpac.MatpacModel",
    "AutoModelForPreTraining": "modeling_matpac.MatpacForPreTraining",
    "AutoModelForAudioClassification": "modeling_matpac.MatpacForAudioClassification",
}
_POSITIVE_INTEGERS = (
    "sampling_rate num_mel_bins n_fft hop_length patch_size num_frames num_hidden_layers num_attention_heads "
    "intermediate_size predictor_num_hidden_layers predictor_num_attention_heads predictor_intermediate_size "
    "predictor_num_hypotheses head_hidden_size head_bottleneck_size head_num_layers head_num_prototypes "
    "ema_anneal_end_step"
).split()
_POSITIVE_FLOATS = (
    "lms_std layer_norm_eps student_temperature teacher_temperature teacher_temperature_warmup mcl_temperature_start "
    "mcl_temperature_end"
).split()
# `log_offset` is added to float32 mel powers: below float32's smallest normal number it may round to 0, and the log
# of digital silence is -inf.
_FLOAT32 = np.finfo(np.float32)
# The constraints on one field alone: checked at construction, on assignment, on save and when a model is built.
# name -> (test, requirement)
FIELD_RULES = {
    **{name: (lambda value: value > 0, "positive") for name in _POSITIVE_INTEGERS},
    # The sin-cos position embedding splits the width into four parts.
    **{
        name: (lambda value: value > 0 and value % 4 == 0, "positive and divisible by 4 (sin-cos positions)")
        for name in ("hidden_size", "predictor_hidden_size")
    },
    **{name: (lambda value: 0 < value < math.inf, "positive and finite") for name in _POSITIVE_FLOATS},
    "log_offset": (
        lambda value: _FLOAT32.tiny <= value <= _FLOAT32.max,
        f"a positive, finite float32 in [{float(_FLOAT32.tiny)}, {float(_FLOAT32.max)}]",
    ),
    "lms_mean": (math.isfinite, "finite"),
    "initializer_range": (lambda value: 0 <= value < math.inf, ">= 0 and finite"),
    "hidden_act": (lambda value: value in ACT2FN, "an activation name of transformers' `ACT2FN`"),
    "mask_ratio": (lambda value: 0 < value < 1, "in (0, 1)"),
    "loss_pred_weight": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "center_momentum": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "center_mode": (lambda value: value in CENTER_MODES, f"one of {CENTER_MODES}"),
    **{
        name: (lambda value: 0 <= value <= 1, "in [0, 1]")
        for name in ("ema_decay", "ema_end_decay", "head_ema_decay", "head_ema_end_decay")
    },
    "teacher_temperature_warmup_steps": (lambda value: value >= 0, ">= 0"),
    "mcl_temperature_decay": (lambda value: 0 < value <= 1, "in (0, 1]"),
    "classifier_pooling": (lambda value: value in CLASSIFIER_POOLINGS, f"one of {CLASSIFIER_POOLINGS}"),
    # transformers does not check it: a misspelt type gave a softmax to a multi-label head's pipeline scores.
    "problem_type": (lambda value: value in PROBLEM_TYPES, f"one of {PROBLEM_TYPES}"),
}


def check_field(name: str, value) -> None:
    """Raises a `ValueError` naming the field if `value` breaks its rule in `FIELD_RULES`."""
    test, requirement = FIELD_RULES[name]
    if not test(value):
        got = repr(value) if isinstance(value, str) else value
        raise ValueError(f"`{name}` must be {requirement}, got {got}.")


# The front end, described once: each config field and the `MatpacFeatureExtractor` argument it sets (the feature
# extractor's defaults are these fields' defaults, and `MatpacFeatureExtractor.from_model_config` copies them).
FRONT_END_FIELDS = {
    "num_mel_bins": "feature_size",
    "sampling_rate": "sampling_rate",
    "n_fft": "n_fft",
    "hop_length": "hop_length",
    "f_min": "f_min",
    "f_max": "f_max",
    "log_offset": "log_offset",
    "lms_mean": "mean",
    "lms_std": "std",
}


def check_front_end_ranges(sampling_rate: int, n_fft: int, hop_length: int, f_min: float, f_max: float) -> None:
    """The front end's rules across fields, for the config and the feature extractor alike."""
    if not 0 <= f_min < f_max <= sampling_rate / 2:
        raise ValueError(
            f"The mel range must satisfy 0 <= f_min < f_max <= sampling_rate / 2, got f_min={f_min}, f_max={f_max}, "
            f"sampling_rate={sampling_rate}."
        )
    if hop_length > n_fft:
        raise ValueError(f"`hop_length` ({hop_length}) must not exceed `n_fft` ({n_fft}).")


@strict
class MatpacConfig(PreTrainedConfig):
    r"""
    Configuration of a MATPAC model (Masked Latent Prediction And Classification, Quelennec et al., ICASSP 2025).
    The defaults are the published ViT-B model and the paper's best pre-training recipe.

    Front end (the single source of [`MatpacFeatureExtractor`]'s settings, see `FRONT_END_FIELDS`):
        sampling_rate (`int`, defaults to 16000): Sampling rate the model was trained on, in Hz.
        num_mel_bins (`int`, defaults to 80): Number of mel bands of the log-mel input.
        n_fft (`int`, defaults to 400): FFT size and Hann window length, in samples (25 ms).
        hop_length (`int`, defaults to 160): Hop between frames, in samples (10 ms).
        f_min (`float`, defaults to 50.0) / f_max (`float`, defaults to 8000.0): Mel filterbank range, in Hz.
        log_offset (`float`, defaults to float32 eps): Added to the mel power before the logarithm.
        lms_mean (`float`, defaults to -7.056) / lms_std (`float`, defaults to 4.193): Log-mel statistics of the
            pre-training set, used to normalise the input.

    Encoder:
        patch_size (`int`, defaults to 16): Side of the square log-mel patches.
        num_frames (`int`, defaults to 608): Frames of one encoder chunk (6.08 s). Longer inputs are split into
            chunks of this length; it also fixes the size of the position grid.
        hidden_size (`int`, defaults to 768): Width of the encoder.
        num_hidden_layers (`int`, defaults to 12): Number of transformer blocks of the encoder.
        num_attention_heads (`int`, defaults to 12): Attention heads per encoder block.
        intermediate_size (`int`, defaults to 3072): Width of the MLP inside each block.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact GELU in the authors' code).
        layer_norm_eps (`float`, defaults to 1e-6): Epsilon of every LayerNorm.
        qkv_bias (`bool`, defaults to `True`): Whether the attention projections have a bias.
        initializer_range (`float`, defaults to 0.02): Std of the normal initialisation of the CLS and mask tokens.

    Predictor (the M2D-style decoder that predicts the teacher's latents of the masked patches):
        predictor_hidden_size (`int`, defaults to 512), predictor_num_hidden_layers (`int`, defaults to 8),
        predictor_num_attention_heads (`int`, defaults to 16), predictor_intermediate_size (`int`, defaults to 2048).
        predictor_num_hypotheses (`int`, defaults to 1): Output heads of the predictor. 1 is MATPAC (one linear
            projection); more is MATPAC++ (5 in the paper): that many independent linear heads, trained by
            multiple-choice learning (per masked patch, the head closest to the teacher wins).

    Multiple-choice learning (MATPAC++, used when `predictor_num_hypotheses > 1`): the prediction loss of a patch is
    annealed winner-takes-all, `sum_h w_h l_h` with `w = softmax(-l / tau)` over the heads (not back-propagated),
    while `tau(t) = mcl_temperature_start * mcl_temperature_decay**t` (t = optimizer updates done) is above
    `mcl_temperature_end`, and the smallest head loss from then on:
        mcl_temperature_start (`float`, defaults to 0.1): Temperature at step 0.
        mcl_temperature_end (`float`, defaults to 1e-4): Temperature at or below which the hard minimum is used
            (from update 230,256 with the defaults).
        mcl_temperature_decay (`float`, defaults to 0.99997): Factor applied to the temperature at every update.

    Classification heads (DINO-style projection heads of the student and teacher):
        head_hidden_size (`int`, defaults to 2048): Width of the hidden layers of the head MLP.
        head_bottleneck_size (`int`, defaults to 256): Width of the l2-normalised bottleneck.
        head_num_layers (`int`, defaults to 3): Linear layers of the head MLP.
        head_num_prototypes (`int`, defaults to 2048): Number of classes K of the weight-normalised last layer.

    Pre-training objective:
        mask_ratio (`float`, defaults to 0.7): Fraction of the patches hidden from the student.
        loss_pred_weight (`float`, defaults to 0.5): Weight alpha of the prediction loss; the classification loss
            gets 1 - alpha.
        student_temperature (`float`, defaults to 0.1): Softmax temperature of the student head.
        teacher_temperature (`float`, defaults to 0.07): Teacher temperature after the warm-up.
        teacher_temperature_warmup (`float`, defaults to 0.04): Teacher temperature at step 0.
        teacher_temperature_warmup_steps (`int`, defaults to 9827): Optimizer steps of the linear temperature
            warm-up (10 epochs of AudioSet at batch 2048 in the best model).
        center_momentum (`float`, defaults to 0.9): Momentum of the centre's moving average.
        center_mode (`str`, defaults to `"probabilities"`): What the centre averages. `"probabilities"` is the
            authors' code (the sharpened teacher probabilities; it produced the published weights), `"logits"`
            is the paper and DINO (the teacher head's logits).
        ema_decay (`float`, defaults to 0.99995) / ema_end_decay (`float`, defaults to 0.99999): Teacher encoder
            EMA decay, linear from start to end over `ema_anneal_end_step`.
        head_ema_decay (`float`, defaults to 0.998) / head_ema_end_decay (`float`, defaults to 1.0): Teacher head
            EMA decay schedule, over the same steps. A decay of 1 means no update.
        ema_anneal_end_step (`int`, defaults to 294816): Step at which both decays reach their end value (the best
            model's `max_update`). A training loop that knows its length passes it instead (`MatpacTrainer` passes
            `max_steps` to [`~MatpacForPreTraining.update_teachers_and_center`]), leaving this field as it is.

    Audio classification ([`MatpacForAudioClassification`]):
        freeze_encoder (`bool`, defaults to `False`): Train only the linear head (the paper's linear probe): the
            encoder's parameters are frozen when the model is built or loaded. To change it on a built model, call
            [`~MatpacForAudioClassification.freeze_encoder`] or [`~MatpacForAudioClassification.unfreeze_encoder`].
        classifier_pooling (`str`, defaults to `"concatenate"`): Clip embedding the head reads. `"concatenate"` is
            `pooler_output` (the frequency patches of a time step concatenated, averaged over time; the paper's probe
            and the authors' released probes); `"frequency_mean"` averages each time step's frequency patches into
            one `hidden_size` vector first (the authors' AudioSet fine-tuned classifier).
        classifier_batch_norm (`bool`, defaults to `False`): Standardise the clip embedding with a non-affine
            BatchNorm (no learned scale or shift) before the linear head, as the AudioSet classifier does. As any
            BatchNorm, it uses and updates batch statistics in train mode (a batch of one clip uses the running
            ones) and its running statistics in eval mode.
        problem_type (`str`, *optional*): `"multi_label_classification"` for tagging (AudioSet, FSD50K, ...):
            binary cross-entropy in training, and `pipeline("audio-classification")` scores with a sigmoid instead
            of a softmax.

    Example:

    ```python
    >>> from modeling_matpac import MatpacConfig, MatpacModel

    >>> config = MatpacConfig()
    >>> model = MatpacModel(config)
    ```"""

    model_type = "matpac"

    sampling_rate: int = 16000
    num_mel_bins: int = 80
    n_fft: int = 400
    hop_length: int = 160
    f_min: float = 50.0
    f_max: float = 8000.0
    log_offset: float = 1.1920928955078125e-07
    lms_mean: float = -7.056
    lms_std: float = 4.193

    patch_size: int = 16
    num_frames: int = 608
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 0.02

    predictor_hidden_size: int = 512
    predictor_num_hidden_layers: int = 8
    predictor_num_attention_heads: int = 16
    predictor_intermediate_size: int = 2048
    predictor_num_hypotheses: int = 1

    mcl_temperature_start: float = 0.1
    mcl_temperature_end: float = 1e-4
    mcl_temperature_decay: float = 0.99997

    head_hidden_size: int = 2048
    head_bottleneck_size: int = 256
    head_num_layers: int = 3
    head_num_prototypes: int = 2048

    mask_ratio: float = 0.7
    loss_pred_weight: float = 0.5
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    teacher_temperature_warmup: float = 0.04
    teacher_temperature_warmup_steps: int = 9827
    center_momentum: float = 0.9
    center_mode: str = "probabilities"
    ema_decay: float = 0.99995
    ema_end_decay: float = 0.99999
    head_ema_decay: float = 0.998
    head_ema_end_decay: float = 1.0
    ema_anneal_end_step: int = 294816

    freeze_encoder: bool = False
    classifier_pooling: str = "concatenate"
    classifier_batch_norm: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        # A plain ValueError at construction; `@strict` runs the `validate_*` methods again (and on save), and every
        # MATPAC model runs this one when it is built.
        self.validate_architecture()

    def __setattr__(self, name, value):
        if name in FIELD_RULES and self.__dict__.get("_post_init_done"):  # construction checks all fields at once
            check_field(name, value)
        super().__setattr__(name, value)

    @property
    def num_frequency_patches(self) -> int:
        return self.num_mel_bins // self.patch_size

    @property
    def num_time_patches(self) -> int:
        return self.num_frames // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_frequency_patches * self.num_time_patches

    @property
    def num_visible_patches(self) -> int:
        """Patches the student sees: `int(L * (1 - mask_ratio))`, as the authors' masking."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def embedding_size(self) -> int:
        """Width of a time step's embedding: the frequency patches of one column concatenated."""
        return self.num_frequency_patches * self.hidden_size

    def validate_architecture(self):
        """Refuses combinations that cannot build or train a model, saying which field is wrong."""
        for name in FIELD_RULES:
            check_field(name, getattr(self, name))
        if self.num_mel_bins % self.patch_size:
            raise ValueError(
                f"`num_mel_bins` ({self.num_mel_bins}) must be divisible by `patch_size` ({self.patch_size})."
            )
        if self.num_frames % self.patch_size:
            raise ValueError(
                f"`num_frames` ({self.num_frames}) must be divisible by `patch_size` ({self.patch_size})."
            )
        for prefix in ("", "predictor_"):
            width, heads = getattr(self, f"{prefix}hidden_size"), getattr(self, f"{prefix}num_attention_heads")
            if width % heads:
                raise ValueError(
                    f"`{prefix}hidden_size` ({width}) must be divisible by `{prefix}num_attention_heads` ({heads})."
                )
        if self.num_visible_patches < 1 or self.num_visible_patches == self.num_patches:
            raise ValueError(
                f"`mask_ratio` {self.mask_ratio} leaves {self.num_visible_patches} of {self.num_patches} patches "
                "visible: the student and the teacher each need at least one patch."
            )
        check_front_end_ranges(self.sampling_rate, self.n_fft, self.hop_length, self.f_min, self.f_max)
        self.validate_labels()

    def validate_labels(self):
        """The classes a head predicts: 1 or more, numbered 0 to `num_labels` - 1, named alike both ways."""
        if self.num_labels < 1:
            raise ValueError(f"`num_labels` must be at least 1, got {self.num_labels}: a head needs a class.")
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(
                f"`id2label` must number the classes 0 to {self.num_labels - 1}, got {sorted(self.id2label)[:10]}: "
                "output i of the head is class i."
            )
        wrong = [name for name, index in (self.label2id or {}).items() if self.id2label.get(index) != name]
        if wrong:
            raise ValueError(f"`label2id` contradicts `id2label` for {wrong[:5]}: give one of them, or both alike.")


__all__ = ["AUTO_MAP", "FIELD_RULES", "FRONT_END_FIELDS", "MatpacConfig"]
