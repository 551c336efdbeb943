import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

from modeling_matpac import MatpacConfig
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
