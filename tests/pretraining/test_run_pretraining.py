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


def test_builtin_default_trains_and_saves_a_loadable_model(tmp_path, monkeypatch):
    allocator_settings = []
    monkeypatch.setattr(run_pretraining, "keep_freed_memory_mapped", lambda: allocator_settings.append(1) or True)
    history = run(tmp_path, "--max_steps", "4", "--builtin_corpus_clips", "6")
    assert allocator_settings == [1]  # on CPU the script keeps freed memory for the next steps
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(entry["loss"]) and entry["num_skipped_short"] == 0 for entry in losses)
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, MatpacModel) and model.config.hidden_size == 32
    pretraining = MatpacForPreTraining.from_pretrained(tmp_path)
    # The EMA annealed over the 4 steps of the run; the saved config keeps the user's value.
    assert pretraining.config.ema_anneal_end_step == MatpacConfig().ema_anneal_end_step
    assert pretraining.config.teacher_temperature_warmup_steps == 200
    assert [entry["ema_decay"] for entry in losses] == pytest.approx([0.99995 + 1e-5 * step for step in range(4)])
    assert torch.count_nonzero(pretraining.center) > 0
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    waveform = np.sin(np.linspace(0, 2000, 24000)).astype(np.float32)
    with torch.no_grad():
        embedding = model(**extractor(waveform, sampling_rate=16000, return_tensors="pt")).pooler_output
    assert embedding.shape == (1, 160) and torch.isfinite(embedding).all()
    card = (tmp_path / "README.md").read_text()
    assert (
        "Pre-trained for 4 steps on the built-in synthetic corpus." in card
        and "**Data:** the built-in synthetic corpus, 6 clips, random 6.08 s crops.\n" in card
        and "{" not in card.split("---")[1]
    )


def test_builtin_defaults_give_a_fresh_model_the_small_config_and_a_loaded_one_its_own():
    model_args, _, training_args, builtin = run_pretraining.parse_arguments(["--output_dir", "out"])
    assert builtin and model_args.config_overrides.startswith("hidden_size=192,")
    assert training_args.max_steps == 600 and training_args.per_device_train_batch_size == 16
    model_args, _, training_args, builtin = run_pretraining.parse_arguments(
        ["--output_dir", "out", "--model_name_or_path", "some/model"]
    )
    assert builtin and model_args.config_overrides is None and training_args.max_steps == 600
    model_args, _, training_args, builtin = run_pretraining.parse_arguments(
        ["--output_dir", "out", "--train_dir", "audio"]
    )
    assert not builtin and model_args.config_overrides is None and training_args.max_steps == -1
    # Before: the hyphenated spellings that --help lists were not seen: --train-dir trained on the built-in corpus.
    for argv in (["--train-dir", "audio"], ["--train_d", "audio"], ["--train-cache=cache"]):
        _, data_args, training_args, builtin = run_pretraining.parse_arguments(["--output_dir", "out", *argv])
        assert not builtin and training_args.max_steps == -1 and training_args.per_device_train_batch_size == 256
    model_args, _, training_args, builtin = run_pretraining.parse_arguments(
        ["--output_dir", "out", "--model-name-or-path", "some/model", "--max-steps", "7"]
    )
    assert builtin and model_args.config_overrides is None and training_args.max_steps == 7


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
    short, corrupt = int(last["num_skipped_short"]), int(last["num_skipped_corrupt"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        f"5 clips, random 6.08 s crops; the pipeline skipped a clip {short + corrupt} times ({short} shorter than a "
        f"crop, {corrupt} undecodable) until step 3, a clip counted at every epoch that met it.\n"
    ) in card and "(warm-up 1 steps, then cosine)" in card


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
    # --warmup_steps wins over the warm-up in epochs, 0 included (before: 0 read as not given, 20 epochs of warm-up).
    # ceil(333 / 10) = 34 steps per epoch: the default 20 epochs of warm-up are 680 steps.
    for flags, warmup_steps in [
        ([], 680),
        (["--warmup_steps", "0"], 0),
        (["--warmup-steps=5", "--warmup_epochs", "2"], 5),
    ]:
        model_args, _, training_args, _ = run_pretraining.parse_arguments(
            ["--train_dir", "unused", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "10", *flags]
        )
        run_pretraining.resolve_schedules(model_args, training_args, config, dataset_size=333)
        assert training_args.warmup_steps == warmup_steps, flags


def test_epochs_count_the_global_batch_of_every_process_and_round_to_the_nearest_step(tmp_path, monkeypatch):
    """A step of 2 processes takes 2 x 10 clips: ceil(995 / 20) = 50 steps per epoch; 0.9 epochs are 45 steps."""
    model_args, _, training_args, _ = run_pretraining.parse_arguments(
        ["--train_dir", "unused", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "10",
         "--num_train_epochs", "3", "--warmup_epochs", "0.9", "--teacher_temperature_warmup_epochs", "2", "--use_cpu"]
    )  # fmt: skip
    monkeypatch.setattr(type(training_args), "world_size", property(lambda self: 2))
    config = MatpacConfig(**tiny_config_kwargs())
    assert run_pretraining.global_batch_size(training_args) == 20
    run_pretraining.resolve_schedules(model_args, training_args, config, dataset_size=995)
    assert (training_args.max_steps, training_args.warmup_steps, config.teacher_temperature_warmup_steps) == (
        150,
        45,
        100,
    )
    # 0.9 x ceil(333 / 20) = 0.9 x 17 = 15.3 -> 15; 0.9 x ceil(333 / 10) on one process = 30.6 -> 31, not 30.
    for world_size, warmup_steps in [(2, 15), (1, 31)]:
        monkeypatch.setattr(type(training_args), "world_size", property(lambda self, size=world_size: size))
        training_args.warmup_steps = 0
        run_pretraining.resolve_schedules(model_args, training_args, config, dataset_size=333)
        assert training_args.warmup_steps == warmup_steps, world_size


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
    with pytest.raises(ValueError, match="--dataset_size must be a positive number of clips, got 0"):
        run_pretraining.main(["--output_dir", str(tmp_path), "--train_dir", str(tmp_path), "--dataset_size", "0"])


def readme_audioset_command() -> list[str]:
    """The flags of the README's AudioSet command (the paper's run), after `run_pretraining.py`."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme[
        readme.index("accelerate launch --config_file configs/accelerate_ddp_bf16.yaml run_pretraining.py") :
    ]
    command = block[: block.index("\n```")].replace("\\\n", " ")
    return command.split("run_pretraining.py", 1)[1].split()


def test_readme_paper_run_gets_the_paper_schedule_on_the_data_it_names(tmp_path, caplog, monkeypatch):
    flags = readme_audioset_command()
    assert flags[flags.index("--dataset_config_name") + 1] == "full"
    assert flags[flags.index("--dataset_split") + 1] == "bal_train+unbal_train"
    # 8 processes of 256 clips in bf16, as the accelerate config launches, simulated by 8 accumulation steps on one.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    model_args, data_args, training_args, _ = run_pretraining.parse_arguments(
        [*flags, "--output_dir", str(tmp_path), "--gradient_accumulation_steps", "8", "--use_cpu"]
    )
    assert data_args.dataset_size == 18_685 + 1_738_788  # the card's bal_train and unbal_train
    config = MatpacConfig(**tiny_config_kwargs())
    run_pretraining.resolve_schedules(model_args, training_args, config, data_args.dataset_size)
    # ceil(1,757,473 / 2048) = 859 steps per epoch: 300, 20 and 10 epochs.
    assert (training_args.max_steps, training_args.warmup_steps, config.teacher_temperature_warmup_steps) == (
        257_700,
        17_180,
        8_590,
    )
    with caplog.at_level(logging.INFO):
        run_pretraining.log_recipe(training_args, config, data_args.dataset_size, "cuda")
    assert "global batch 2048 = 256 per device x 1 processes x 8 accumulation steps" in caplog.text
    assert "257700 steps (300.00 epochs) of 1,757,473 clips per epoch (859 steps per epoch)" in caplog.text
    assert "warm-up 17180 steps (20.00 epochs)" in caplog.text and "warm-up 8590 steps (10.00 epochs)" in caplog.text
    assert "8 DataLoader workers" in caplog.text and "weight decay 0.05 on all parameters" in caplog.text
    assert "bf16 on cuda" in caplog.text and "Not the paper's recipe" not in caplog.text


def test_deviations_from_the_paper_are_warned(tmp_path, caplog):
    model_args, _, training_args, _ = run_pretraining.parse_arguments(
        ["--train_dir", "unused", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "64",
         "--max_steps", "100", "--warmup_steps", "10", "--weight_decay_set", "transformers", "--use_cpu"]
    )  # fmt: skip
    config = MatpacConfig(**tiny_config_kwargs())
    run_pretraining.resolve_schedules(model_args, training_args, config, dataset_size=6400)
    with caplog.at_level(logging.WARNING):
        run_pretraining.log_recipe(training_args, config, 6400, "cuda")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "a global batch of 64 clips instead of 2048" in warnings[0]
    assert "fp32 on GPU" in warnings[1] and "no DataLoader workers on GPU" in warnings[2]
    assert "no weight decay on biases and LayerNorm weights" in warnings[3]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_pretraining.log_recipe(training_args, config, 6400, "cpu")
    assert len(caplog.records) == 2  # precision and workers are GPU matters


def test_audioset_layout_trains_on_both_training_splits_with_epochs_from_the_card(tmp_path, caplog):
    from test_data import _audioset_like

    root = _audioset_like(tmp_path / "AudioSet")
    with caplog.at_level(logging.INFO):
        history = run(tmp_path / "out", "--dataset_name", str(root), "--dataset_config_name", "full",
                      "--dataset_split", "bal_train+unbal_train", "--num_train_epochs", "1",
                      "--warmup_epochs", "0.5", "--teacher_temperature_warmup_epochs", "1")  # fmt: skip
    # The card declares 2 + 4 clips: 3 steps of 2 clips make one epoch, the short clip counted but skipped.
    assert "Epochs count the source's 6 clips, those shorter than a crop included" in caplog.text
    assert "3 steps (1.00 epochs) of 6 clips per epoch (3 steps per epoch)" in caplog.text
    assert "a global batch of 2 clips instead of 2048" in caplog.text
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2, 3] and losses[-1]["num_skipped_short"] >= 1
    assert MatpacForPreTraining.from_pretrained(tmp_path / "out").config.teacher_temperature_warmup_steps == 3


def test_one_flag_trains_matpac_plus_plus_from_the_log_mel_cache(tmp_path):
    cache = tmp_path / "logmels"
    with pytest.raises(FileNotFoundError):  # it only pre-processes: no trainer state
        run(tmp_path / "prepare", "--preprocess_to", str(cache), "--builtin_corpus_clips", "3")
    flags = ("--train_cache", str(cache), "--max_steps", "2", "--predictor_num_hypotheses", "5")
    history = run(tmp_path / "train", *flags)
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["mcl_temperature"] for entry in losses] == pytest.approx([0.1, 0.1 * 0.99997])
    for entry in losses:
        assert sum(entry[f"mcl_win_share_{head}"] for head in range(5)) == pytest.approx(1, abs=1e-5)
    pretraining = MatpacForPreTraining.from_pretrained(tmp_path / "train")
    assert pretraining.config.predictor_num_hypotheses == 5 and len(pretraining.mcl_heads.heads) == 5
    assert pretraining.config.hidden_size == 32  # the flag leaves the other overrides alone
    card = (tmp_path / "train" / "README.md").read_text()
    assert "Pre-trained as MATPAC++ (5 multiple-choice prediction heads) for 2 steps on " in card
    encoder = AutoModel.from_pretrained(tmp_path / "train")
    assert isinstance(encoder, MatpacModel)
    assert torch.equal(encoder.encoder.layers[0].mlp.fc1.weight, pretraining.matpac.encoder.layers[0].mlp.fc1.weight)


def test_a_run_on_the_gpu_agrees_on_sigterm_through_its_own_gloo_group(tmp_path, monkeypatch):
    """NCCL reduces only GPU tensors, and one on the GPU would make the host wait for the step at each check."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        args = run_pretraining.MatpacTrainingArguments(output_dir=str(tmp_path), use_cpu=True, ddp_timeout=120)
        assert run_pretraining.cpu_group(args) is None  # one process: nothing to agree with
        monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
        assert run_pretraining.cpu_group(args) is torch.distributed.group.WORLD  # a gloo run has one already
        get_backend = torch.distributed.get_backend
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
        group = run_pretraining.cpu_group(args)
        assert group is not torch.distributed.group.WORLD and get_backend(group) == "gloo"
        flag = torch.tensor([1], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        assert flag.item() == 1
    finally:
        torch.distributed.destroy_process_group()
