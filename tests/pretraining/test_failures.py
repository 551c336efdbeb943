"""Issue 11: no input, fault or flag loses a run or a result silently."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from pretraining_worker import FixedCrops, tiny_model
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from modeling_matpac.audio import AudioDecodeError, decode_mono_16k
from modeling_matpac.pretraining import MatpacPretrainingDataset, MatpacTrainer, NonFiniteTrainingError


# ---------------------------------------------------------------------------------------------------------------------
# 1. Non-finite values


class PoisonedCrops(FixedCrops):
    """Fixed crops that turn NaN once `poisoned` is set (this process reads them: no DataLoader workers)."""

    poisoned = False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = super().__getitem__(index)
        if PoisonedCrops.poisoned:
            example["input_values"] = torch.full_like(example["input_values"], float("nan"))
        return example


class PoisonAfterStep2(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        PoisonedCrops.poisoned = state.global_step >= 2


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, logging_steps):
    """Before: the run went on, logged `loss` 0 and saved NaN weights over checkpoint-2's, then exited 0."""
    monkeypatch.setattr(PoisonedCrops, "poisoned", False)
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=2, max_steps=6, learning_rate=1e-3, logging_steps=logging_steps,
        save_steps=2, save_total_limit=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = MatpacTrainer(model=tiny_model(), args=args, train_dataset=PoisonedCrops())
    trainer.add_callback(PoisonAfterStep2())
    with pytest.raises(NonFiniteTrainingError, match=r"step [34]: .*last good checkpoint, .*checkpoint-2"):
        trainer.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if logging_steps == 1:  # the NaN step is logged as NaN, not as 0
        assert len(logged) >= 3 and all(loss > 1 for loss in logged[:-1]) and math.isnan(logged[-1])
