"""Shared test setup: offline hub, the authors' golden fixtures and tiny configs."""

import os
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"

# The fixture README's tiny models: what the converter cannot read from the tensor shapes.
FIXTURE_HEADS = {"num_attention_heads": 4, "predictor_num_attention_heads": 4}
# The fixture's pre-training schedules (tiny, so that all of them move within 4 steps).
FIXTURE_SCHEDULES = {
    "ema_decay": 0.6,
    "ema_end_decay": 0.7,
    "head_ema_decay": 0.9,
    "head_ema_end_decay": 1.0,
    "ema_anneal_end_step": 4,
    "teacher_temperature_warmup_steps": 2,
}


def tiny_config_kwargs(**overrides) -> dict:
    """A MATPAC small enough for fast CPU tests, with every module present."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        predictor_hidden_size=16,
        predictor_num_hidden_layers=1,
        predictor_num_attention_heads=2,
        predictor_intermediate_size=32,
        head_hidden_size=32,
        head_bottleneck_size=16,
        head_num_prototypes=24,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    from modeling_matpac import MatpacConfig

    return MatpacConfig(**tiny_config_kwargs())


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
