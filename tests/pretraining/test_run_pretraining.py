import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_config_kwargs
from transformers import AutoFeatureExtractor, AutoModel

from modeling_matpac import MatpacConfig, MatpacForPreTraining, MatpacModel


sys.path.insert(0, str(Path(__file__).parents[2]))
import run_pretraining  # noqa: E402


TINY = ",".join(f"{name}={value}" for name, value in tiny_config_kwargs().items())


def run(tmp_path, *flags):
    run_pretraining.main(
        ["--output_dir", str(tmp_path), "--config_overrides", TINY, "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm", "True", *flags]
    )  # fmt: skip
    return json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]


def test_builtin_default_trains_and_saves_a_loadable_model(tmp_path):
    history = run(tmp_path, "--max_steps", "4", "--builtin_corpus_clips", "6")
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(entry["loss"]) and entry["num_skipped_short"] == 0 for entry in losses)
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, MatpacModel) and model.config.hidden_size == 32
    pretraining = MatpacForPreTraining.from_pretrained(tmp_path)
    assert pretraining.config.ema_anneal_end_step == 4 and pretraining.config.teacher_temperature_warmup_steps == 200
    assert torch.count_nonzero(pretraining.center) > 0
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    waveform = np.sin(np.linspace(0, 2000, 24000)).astype(np.float32)
    with torch.no_grad():
        embedding = model(**extractor(waveform, sampling_rate=16000, return_tensors="pt")).pooler_output
    assert embedding.shape == (1, 160) and torch.isfinite(embedding).all()
    card = (tmp_path / "README.md").read_text()
    assert (
        "Pre-trained for 4 steps on the built-in synthetic corpus (6 clips)" in card
        and "{" not in card.split("---")[1]
    )


def test_corrupt_and_short_files_are_skipped_and_counted(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        sf.write(data / f"good{index}.wav", 0.1 * rng.standard_normal(7 * 16000), 16000)
    sf.write(data / "short.flac", 0.1 * rng.standard_normal(3 * 22050), 22050)
    (data / "broken.wav").write_bytes(b"RIFF not really a wave file")
    with caplog.at_level(logging.WARNING):
        history = run(tmp_path / "out", "--train_dir", str(data), "--max_steps", "3", "--warmup_steps", "1",
                      "--teacher_temperature_warmup_steps", "2")  # fmt: skip
    assert "Skipping undecodable audio clip" in caplog.text and "broken.wav" in caplog.text
    last = [entry for entry in history if "loss" in entry][-1]
    # 3 steps of 2 crops = 6 crops = 2 epochs of the 3 good clips, each epoch also meeting the bad two.
    assert last["num_skipped_corrupt"] >= 1 and last["num_skipped_short"] >= 1
    assert last["step"] == 3 and np.isfinite(last["loss"])


def test_epochs_become_steps_from_the_dataset_size(tmp_path):
    model_args, _, training_args, _ = run_pretraining.parse_arguments(
        ["--train_dir", "unused", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "10",
         "--num_train_epochs", "3", "--warmup_epochs", "1", "--teacher_temperature_warmup_epochs", "2", "--use_cpu"]
    )  # fmt: skip
    config = MatpacConfig(**tiny_config_kwargs())
    run_pretraining.resolve_schedules(model_args, training_args, config, dataset_size=995)
    assert (training_args.max_steps, training_args.warmup_steps, config.teacher_temperature_warmup_steps) == (
        300,
        100,
        200,
    )
    assert training_args.learning_rate == 3e-4 and training_args.adam_beta2 == 0.95
    assert training_args.max_grad_norm == 3.0 and training_args.weight_decay == 0.05
    with pytest.raises(ValueError, match="size is unknown"):
        run_pretraining.resolve_schedules(model_args, training_args.__class__(str(tmp_path)), config, None)


def test_bad_flags_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not have: \\['hidden_sise'\\]"):
        run_pretraining.main(["--output_dir", str(tmp_path), "--config_overrides", "hidden_sise=32"])
    with pytest.raises(ValueError, match="hidden_size expects int, got 'big'"):
        run_pretraining.main(["--output_dir", str(tmp_path), "--config_overrides", "hidden_size=big"])
    with pytest.raises(ValueError, match="qkv_bias takes true or false"):
        run_pretraining.main(["--output_dir", str(tmp_path), "--config_overrides", "qkv_bias=no"])
    config = run_pretraining.build_config(
        run_pretraining.ModelArguments(config_overrides="qkv_bias=False,mask_ratio=0.6")
    )
    assert config.qkv_bias is False and config.mask_ratio == 0.6
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_pretraining.main(["--output_dir", str(tmp_path), "--train_dir", str(tmp_path / "nowhere")])
