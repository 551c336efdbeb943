import math

import pytest
import torch
from conftest import tiny_config_kwargs
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers.activations import ACT2FN

from modeling_matpac import MatpacConfig, MatpacModel
from modeling_matpac.configuration_matpac import AUTO_MAP


def test_defaults_are_the_published_vit_b_and_recipe():
    config = MatpacConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (
        config.predictor_hidden_size,
        config.predictor_num_hidden_layers,
        config.predictor_num_attention_heads,
        config.predictor_intermediate_size,
    ) == (512, 8, 16, 2048)
    assert (config.head_hidden_size, config.head_bottleneck_size, config.head_num_layers) == (2048, 256, 3)
    assert config.head_num_prototypes == 2048
    assert (config.num_patches, config.num_visible_patches, config.embedding_size) == (190, 57, 3840)
    assert (config.student_temperature, config.teacher_temperature_warmup, config.teacher_temperature) == (
        0.1,
        0.04,
        0.07,
    )
    assert (config.ema_decay, config.ema_end_decay, config.head_ema_decay, config.head_ema_end_decay) == (
        0.99995,
        0.99999,
        0.998,
        1.0,
    )
    assert (config.lms_mean, config.lms_std, config.f_min, config.f_max) == (-7.056, 4.193, 50.0, 8000.0)
    assert config.center_mode == "probabilities"
    assert config.layer_norm_eps == 1e-6


def test_save_load_round_trip(tmp_path):
    config = MatpacConfig(hidden_size=96, num_attention_heads=3, center_mode="logits", mask_ratio=0.6)
    config.save_pretrained(tmp_path)
    loaded = MatpacConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.num_visible_patches == int(190 * 0.4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_mel_bins": 81}, "num_mel_bins.*divisible by `patch_size`"),
        ({"num_frames": 600}, "num_frames.*divisible by `patch_size`"),
        ({"hidden_size": 100}, "hidden_size.*divisible by `num_attention_heads`"),
        ({"predictor_hidden_size": 100}, "predictor_hidden_size.*divisible"),
        ({"mask_ratio": 0.0}, r"mask_ratio.*\(0, 1\)"),
        ({"mask_ratio": 1.0}, r"mask_ratio.*\(0, 1\)"),
        ({"mask_ratio": 0.999}, "leaves 0 of 190 patches visible"),
        ({"mask_ratio": 1e-17}, "leaves 190 of 190 patches visible"),  # in (0, 1), yet the teacher gets no target
        ({"center_mode": "mean"}, "center_mode"),
        ({"loss_pred_weight": 1.5}, "loss_pred_weight"),
        ({"ema_decay": 1.2}, "ema_decay"),
        ({"hidden_size": 0}, "hidden_size` must be positive"),
        ({"f_max": 9000.0}, "mel range"),
        ({"teacher_temperature": 0.0}, "teacher_temperature` must be positive"),
    ],
)
def test_invalid_configs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatpacConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # Widths the sin-cos position embedding cannot split in four (the model raised when it was built).
        ({"hidden_size": 34, "num_attention_heads": 2}, "`hidden_size` must be positive and divisible by 4"),
        ({"predictor_hidden_size": 18, "predictor_num_attention_heads": 2}, "`predictor_hidden_size` must be"),
        # Digital silence gave a log of 0 (a NaN pooler_output); 1e-50 is 0 in float32.
        ({"log_offset": 0.0}, r"`log_offset` must be a positive, finite float32 in \[1.17.*\], got 0.0\."),
        ({"log_offset": -1.0}, "`log_offset` must be a positive, finite float32"),
        ({"log_offset": 1e-50}, "`log_offset` must be a positive, finite float32"),
        ({"log_offset": math.inf}, "`log_offset` must be a positive, finite float32"),
        ({"lms_std": math.inf}, r"`lms_std` must be positive and finite, got inf\."),
        ({"lms_std": 0.0}, r"`lms_std` must be positive and finite, got 0.0\."),
        ({"lms_std": -4.0}, "`lms_std` must be positive and finite"),
        ({"lms_mean": math.nan}, r"`lms_mean` must be finite, got nan\."),
        ({"lms_mean": -math.inf}, "`lms_mean` must be finite"),
        # "normal expects std >= 0.0" when the model was built.
        ({"initializer_range": -1.0}, r"`initializer_range` must be >= 0 and finite, got -1.0\."),
        ({"initializer_range": math.nan}, "`initializer_range` must be >= 0 and finite"),
        ({"layer_norm_eps": 0.0}, r"`layer_norm_eps` must be positive and finite, got 0.0\."),
        ({"layer_norm_eps": -1e-6}, "`layer_norm_eps` must be positive and finite"),
        # A bare KeyError when the model was built.
        ({"hidden_act": "bogus"}, r"`hidden_act` must be an activation name of transformers' `ACT2FN`, got 'bogus'\."),
        # Infinite temperatures: `mcl_temperature_start=inf` made `mcl_first_hard_step` a math domain error.
        ({"mcl_temperature_start": math.inf}, "`mcl_temperature_start` must be positive and finite, got inf"),
        ({"mcl_temperature_end": math.inf}, "`mcl_temperature_end` must be positive and finite"),
        ({"student_temperature": math.inf}, "`student_temperature` must be positive and finite"),
        ({"teacher_temperature_warmup": math.nan}, "`teacher_temperature_warmup` must be positive and finite"),
        # A misspelt problem type: the pipeline scored a multi-label head with a softmax. Label maps with a gap or
        # no class: a head that could never predict a class, or had no outputs.
        ({"problem_type": "multilabel"}, r"`problem_type` must be one of \(None, 'regression', .*got 'multilabel'"),
        ({"id2label": {0: "dog", 2: "siren"}}, r"`id2label` must number the classes 0 to 1, got \[0, 2\]"),
        ({"num_labels": 0}, "`num_labels` must be at least 1, got 0"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}}, r"`label2id` contradicts `id2label` for"),
    ],
)
def test_fields_that_crash_or_give_nan_later_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatpacConfig(**tiny_config_kwargs(**kwargs))


@pytest.mark.parametrize("hidden_act", sorted(ACT2FN))
def test_every_transformers_activation_is_accepted_and_runs(hidden_act):
    model = MatpacModel(MatpacConfig(**tiny_config_kwargs(hidden_act=hidden_act))).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 80, 32)).pooler_output).all()


def test_new_field_rules_apply_on_assignment_too():
    config = MatpacConfig()
    with pytest.raises(
        ValueError, match=r"`hidden_size` must be positive and divisible by 4 \(sin-cos positions\), got 34"
    ):
        config.hidden_size = 34
    with pytest.raises(ValueError, match="`log_offset` must be a positive, finite float32"):
        config.log_offset = 0.0
    assert (config.hidden_size, config.log_offset) == (768, MatpacConfig().log_offset)


def test_assignment_is_validated_field_by_field():
    config = MatpacConfig()
    with pytest.raises(ValueError, match=r"`mask_ratio` must be in \(0, 1\), got 1.5"):
        config.mask_ratio = 1.5
    with pytest.raises(ValueError, match="`center_mode` must be one of"):
        config.center_mode = "mean"
    with pytest.raises(StrictDataclassFieldValidationError, match="hidden_size"):
        config.hidden_size = "big"
    assert (config.mask_ratio, config.center_mode, config.hidden_size) == (0.7, "probabilities", 768)
    config.mask_ratio = 0.5
    assert config.num_visible_patches == 95


def test_save_refuses_a_config_made_inconsistent_after_construction(tmp_path):
    config = MatpacConfig()
    config.patch_size = 10  # a valid value alone; 608 frames are no whole number of patches
    with pytest.raises(StrictDataclassClassValidationError, match="num_frames.*divisible by `patch_size`"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_every_saved_config_lists_all_classes_for_remote_code(tmp_path):
    MatpacConfig().save_pretrained(tmp_path)
    assert MatpacConfig.from_pretrained(tmp_path).auto_map == AUTO_MAP
