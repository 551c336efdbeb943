import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_config_kwargs
from pretraining_worker import FixedCrops, train
from transformers import AutoFeatureExtractor, TrainerCallback, TrainingArguments

from modeling_matpac import MatpacConfig, MatpacFeatureExtractor, MatpacForPreTraining, MatpacModel
from modeling_matpac.pretraining import MatpacPretrainingDataset, generate_builtin_corpus
from modeling_matpac.pretraining.trainer import (
    BatchTooLargeError,
    MatpacTrainer,
    NonFiniteTrainingError,
    check_supported_arguments,
)


TESTS = Path(__file__).parent


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


# MATPAC, and MATPAC++ with its multiple-choice loss soft at steps 0 and 1 and hard from step 2.
HYPOTHESES = pytest.mark.parametrize("num_hypotheses", [1, 5], ids=["matpac", "matpac++"])


def student_weight(model: MatpacForPreTraining) -> torch.Tensor:
    return model.matpac.encoder.layers[0].mlp.fc1.weight.detach().clone()


class StudentAfterEachStep(TrainerCallback):
    """Records a student weight once each optimizer step is done."""

    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(student_weight(model))


@HYPOTHESES
def test_updates_run_once_per_optimizer_step_under_gradient_accumulation(tmp_path, monkeypatch, num_hypotheses):
    calls, decays, seen = [], [], []
    original = MatpacForPreTraining.update_teachers_and_center

    def spy(self, step, *args):
        calls.append(step)
        seen.append(student_weight(self))
        decays.append(original(self, step, *args))
        return decays[-1]

    monkeypatch.setattr(MatpacForPreTraining, "update_teachers_and_center", spy)
    after = StudentAfterEachStep()
    accumulated = train(
        tmp_path / "ga", batch_size=2, accumulation=2, max_steps=3, num_hypotheses=num_hypotheses, callbacks=[after]
    )
    assert calls == [0, 1, 2]
    # The decays applied are those of the run's 3 steps (none at step 0), not of the config's annealing length.
    assert [encoder for encoder, _ in decays] == pytest.approx([math.nan, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3], nan_ok=True)
    logged = [entry for entry in accumulated.state.log_history if "loss" in entry]
    assert [head for _, head in decays[1:]] == pytest.approx([entry["head_ema_decay"] for entry in logged[1:]])
    # The teachers move toward the student weights of the step's loss: before its optimizer step, not after it.
    for step in (1, 2):
        assert torch.equal(seen[step], after.weights[step - 1]) and not torch.equal(seen[step], after.weights[step])
    monkeypatch.setattr(MatpacForPreTraining, "update_teachers_and_center", original)
    whole = train(tmp_path / "whole", batch_size=4, accumulation=1, max_steps=3, num_hypotheses=num_hypotheses)
    # The same global batches give the same run: centre statistics and EMA cover both micro-batches at once.
    state_ga = accumulated.pretraining_model.state_dict()
    assert max_difference(state_ga, whole.pretraining_model.state_dict()) < 1e-5
    assert torch.count_nonzero(state_ga["center"]) > 0
    # The run's length reached the EMA schedule (see the logged decays below) without rewriting the config.
    assert accumulated.pretraining_model.config.ema_anneal_end_step == MatpacConfig().ema_anneal_end_step


def test_logs_average_the_losses_like_loss(tmp_path):
    trainer = train(tmp_path, batch_size=2, accumulation=2, max_steps=3)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert entry["loss"] == pytest.approx(0.5 * entry["loss_pred"] + 0.5 * entry["loss_cls"], abs=1e-5)
        assert 1 <= entry["teacher_num_classes"] <= 24 and entry["teacher_perplexity"] >= 1
    assert [entry["teacher_temperature"] for entry in logged] == pytest.approx([0.04, 0.055, 0.07])
    assert [entry["ema_decay"] for entry in logged] == pytest.approx([0.5, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3])
    assert not any(name.startswith("mcl_") for name in logged[0])


def test_matpac_plus_plus_logs_its_temperature_and_win_shares(tmp_path):
    trainer = train(tmp_path, batch_size=2, accumulation=2, max_steps=3, num_hypotheses=5)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["mcl_temperature"] for entry in logged] == pytest.approx([0.1, 0.05, 0.025])
    for entry in logged:
        shares = [entry[f"mcl_win_share_{head}"] for head in range(5)]
        # Each share is a fraction of the step's 4 x 133 masked patches (2 micro-batches averaged).
        assert sum(shares) == pytest.approx(1.0, abs=1e-5) and max(shares) < 1
        assert all(share * 4 * 133 == pytest.approx(round(share * 4 * 133), abs=1e-3) for share in shares)
        assert entry["loss"] == pytest.approx(0.5 * entry["loss_pred"] + 0.5 * entry["loss_cls"], abs=1e-5)


def test_collapse_statistics_are_computed_on_logged_steps_only(tmp_path, monkeypatch):
    computed, under_way = [], {}
    original, compute_loss = MatpacForPreTraining.collapse_statistics, MatpacTrainer.compute_loss

    def spy(outputs):
        computed.append((under_way["step"], outputs.teacher_probs.shape[0]))
        return original(outputs)

    def recording_step(self, *args, **kwargs):
        under_way["step"] = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(MatpacForPreTraining, "collapse_statistics", staticmethod(spy))
    monkeypatch.setattr(MatpacTrainer, "compute_loss", recording_step)
    trainer = train(tmp_path, batch_size=2, accumulation=2, max_steps=4, logging_steps=2, logging_first_step=True)
    # Two micro-batches of 2 clips per step; steps 1 (the first), 2 and 4 are logged, step 3 is not.
    assert computed == [(1, 2), (1, 2), (2, 2), (2, 2), (4, 2), (4, 2)]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 4]
    for entry in logged:
        assert 1 <= entry["teacher_num_classes"] <= 24 and 0 < entry["target_std"] < 1


def test_a_compiled_run_compiles_its_step_once(tmp_path, monkeypatch):
    # Logged and unlogged steps alike: the collapse statistics are computed from the outputs, outside the compiled
    # forward, which a flag would otherwise specialise (a second graph at the first logged step).
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    trainer = train(
        tmp_path,
        batch_size=2,
        accumulation=1,
        max_steps=3,
        logging_steps=2,
        torch_compile=True,
        torch_compile_backend="eager",
    )
    torch._dynamo.reset()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2] and 1 <= logged[0]["teacher_num_classes"] <= 24


def test_the_batch_goes_to_the_device_without_waiting_for_the_copy(tmp_path, monkeypatch):
    trainer = MatpacTrainer(
        model=MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs())),
        args=TrainingArguments(tmp_path, use_cpu=True, report_to=[], max_steps=1),
    )
    copies = []
    original = torch.Tensor.to

    def spy(tensor, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    batch = {"input_values": torch.randn(2, 80, 608), "noise": torch.rand(2, 190)}
    prepared = trainer._prepare_inputs(batch)
    # A blocking copy would make the host wait for the device once per micro-batch.
    assert copies == [True, True]
    assert all(torch.equal(prepared[name], batch[name]) for name in batch)


@HYPOTHESES
def test_resume_continues_bit_for_bit(tmp_path, num_hypotheses):
    kwargs = dict(batch_size=2, accumulation=2, max_steps=4, num_hypotheses=num_hypotheses)
    straight = train(tmp_path / "straight", save_steps=2, **kwargs)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    resumed = train(tmp_path / "resumed", resume=str(checkpoint), **kwargs)
    straight_state = straight.pretraining_model.state_dict()
    resumed_state = resumed.pretraining_model.state_dict()
    for name, tensor in straight_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    # The logged averages after the resumption cover the steps since it, as in the uninterrupted run.
    logged = ("step", "loss", "loss_pred", "loss_cls", "teacher_temperature", "ema_decay")
    logged += ("mcl_temperature", "mcl_win_share_0") if num_hypotheses > 1 else ()
    history = [{key: entry[key] for key in logged} for entry in straight.state.log_history if "loss" in entry]
    resumed_history = [{key: entry[key] for key in logged} for entry in resumed.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in resumed_history] == [1, 2, 3, 4]
    assert resumed_history == history
    halfway = MatpacForPreTraining.from_pretrained(checkpoint)
    assert not torch.equal(halfway.center, straight_state["center"])
    assert halfway.config.predictor_num_hypotheses == num_hypotheses
    assert isinstance(MatpacModel.from_pretrained(checkpoint), MatpacModel)


def launch_two_processes(output_dir: Path, *launch_flags: str, worker_args: tuple[str, ...] = ()) -> list[dict]:
    """Runs `pretraining_worker.py` under `accelerate launch`, 2 CPU processes (gloo); returns each rank's result."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "--num_processes", "2"]
    command += [str(TESTS / "pretraining_worker.py"), str(output_dir), *worker_args]
    environment = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    return ranks


def logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


@HYPOTHESES
def test_two_ddp_processes_match_one_process_on_the_same_global_batch(tmp_path, num_hypotheses):
    flags = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    port = str(29531 + 10 * (num_hypotheses > 1))
    worker_args = ("--num_hypotheses", str(num_hypotheses))
    ranks = launch_two_processes(tmp_path, *flags, "--main_process_port", port, worker_args=worker_args)
    single = train(tmp_path / "single", batch_size=4, accumulation=1, max_steps=3, num_hypotheses=num_hypotheses)
    assert max_difference(ranks[0]["state"], single.pretraining_model.state_dict()) < 1e-5
    assert logged_losses(ranks[0]["log_history"]) == pytest.approx(logged_losses(single.state.log_history), abs=1e-5)
    # Every logged value, not only the Trainer's loss: the parts, the statistics and the win shares are averaged over
    # the processes as over the micro-batches (the statistics of a batch, such as the teacher's perplexity, are not
    # linear in it: each process's half counts as a micro-batch).
    halves = train(tmp_path / "halves", batch_size=2, accumulation=2, max_steps=3, num_hypotheses=num_hypotheses)
    runs = (ranks[0]["log_history"], halves.state.log_history)
    logged = [[entry for entry in run if "loss" in entry] for run in runs]
    assert len(logged[0]) == len(logged[1]) == 3
    for distributed, accumulated in zip(*logged):
        assert distributed.keys() == accumulated.keys() and {"loss_pred", "teacher_perplexity"} <= accumulated.keys()
        assert distributed == pytest.approx(accumulated, rel=1e-5, abs=1e-5)
    # Every student parameter has a gradient: DDP does not walk the graph for unused ones at each step (it did).
    assert ranks[0]["find_unused"] is ranks[1]["find_unused"] is False


def test_the_documented_ddp_bf16_config_runs(tmp_path):
    config = Path(__file__).parents[2] / "configs" / "accelerate_ddp_bf16.yaml"
    ranks = launch_two_processes(tmp_path, "--config_file", str(config), "--main_process_port", "29533")
    single = train(tmp_path / "single", batch_size=4, accumulation=1, max_steps=3)
    bf16_losses, fp32_losses = logged_losses(ranks[0]["log_history"]), logged_losses(single.state.log_history)
    assert bf16_losses != fp32_losses and bf16_losses == pytest.approx(fp32_losses, rel=0.02)


def test_each_process_reads_its_own_share_of_the_audio(tmp_path):
    files = generate_builtin_corpus(tmp_path / "corpus", num_clips=8)
    flags = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    worker_args = ("--audio_dir", str(tmp_path / "corpus"))
    launch_two_processes(tmp_path, *flags, "--main_process_port", "29535", worker_args=worker_args)
    seen = [torch.load(tmp_path / f"clips{rank}.pt") for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4
    assert sorted(seen[0] + seen[1]) == sorted(str(path) for path in files)


def test_unsupported_setups_are_refused(tmp_path):
    from pretraining_worker import tiny_model

    args = TrainingArguments(tmp_path, use_cpu=True, report_to=[])
    encoder = MatpacModel(tiny_model().config)
    with pytest.raises(ValueError, match="trains a MatpacForPreTraining"):
        MatpacTrainer(model=encoder, args=args)
    # Before: Trainer never called compute_metrics (evaluation yields no logits), and nothing said so.
    with pytest.raises(ValueError, match="does not take compute_metrics: pre-training has no labels"):
        MatpacTrainer(model=tiny_model(), args=args, compute_metrics=lambda prediction: {"score": 1.0})
    trainer = MatpacTrainer(model=tiny_model(), args=args)
    # Before: from Python, fp16 on the CPU trained in fp32 without a word (the script refused it).
    with pytest.raises(ValueError, match="--fp16 needs a CUDA GPU: on the CPU it would train in fp32"):
        MatpacTrainer(model=tiny_model(), args=TrainingArguments(tmp_path, use_cpu=True, report_to=[], fp16=True))
    for backend in ("is_fsdp_enabled", "is_deepspeed_enabled"):
        setattr(trainer, backend, True)
        with pytest.raises(ValueError, match="FSDP or DeepSpeed"):
            trainer.check_supported_setup()
        setattr(trainer, backend, False)


def running_out_of_memory_above(monkeypatch, batch_size: int, from_step: int = 0) -> list[int]:
    """Makes a training forward of more than `batch_size` clips fail as the CPU allocator does, from `from_step`."""
    original, batches = MatpacForPreTraining.forward, []

    def forward(self, input_values, *args, step=None, **kwargs):
        batches.append(len(input_values))
        if self.training and len(input_values) > batch_size and int(step) >= from_step:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10000000000 bytes.")
        return original(self, input_values, *args, step=step, **kwargs)

    monkeypatch.setattr(MatpacForPreTraining, "forward", forward)
    return batches


def skipping_optimizer_steps(monkeypatch, skipped: set[int]) -> list[tuple[str, int]]:
    """Reports the optimizer steps of `skipped` (by global step) as fp16's loss scaling does after an overflow."""
    import accelerate.optimizer

    calls, steps = [], {"taken": 0}
    original_step, original_forward = accelerate.optimizer.AcceleratedOptimizer.step, MatpacForPreTraining.forward
    original_update = MatpacForPreTraining.update_teachers_and_center

    def step(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        self._is_overflow = steps["taken"] in skipped
        steps["taken"] += 1

    def forward(self, input_values, *args, step=None, **kwargs):
        calls.append(("forward", int(step)))
        return original_forward(self, input_values, *args, step=step, **kwargs)

    def update(self, step, *args):
        calls.append(("update", step))
        return original_update(self, step, *args)

    monkeypatch.setattr(accelerate.optimizer.AcceleratedOptimizer, "step", step)
    monkeypatch.setattr(MatpacForPreTraining, "forward", forward)
    monkeypatch.setattr(MatpacForPreTraining, "update_teachers_and_center", update)
    return calls


def test_steps_that_fp16_skips_hold_back_every_schedule_as_they_hold_back_the_learning_rate(
    tmp_path, monkeypatch, caplog
):
    """Before: the EMA decays and temperatures ran on (global_step), the learning rate waited (its scheduler)."""
    calls = skipping_optimizer_steps(monkeypatch, skipped={1, 2})
    with caplog.at_level("INFO", logger="modeling_matpac.pretraining.trainer"):
        trainer = train(tmp_path, batch_size=2, accumulation=1, max_steps=6, save_steps=4, warmup_steps=2)
    # Updates made before each step: 0, 1, then 1 and 1 again (steps 1 and 2 skipped), 2, 3.
    assert [step for kind, step in calls if kind == "forward"] == [0, 1, 1, 1, 2, 3]
    assert [step for kind, step in calls if kind == "update"] == [0, 1, 1, 1, 2, 3]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    warm_up = [0.0, 0.5, 0.5, 0.5]  # the learning rate of updates 0, 1, 1, 1 (2 warm-up steps)
    assert [entry["learning_rate"] for entry in logged][:4] == pytest.approx([1e-3 * rate for rate in warm_up])
    expected = [trainer.pretraining_model.ema_decays(step - 1, 6)[0] for step in [1, 2, 2, 2, 3, 4]]
    assert [entry["ema_decay"] for entry in logged] == pytest.approx(expected)
    assert "fp16's loss scaling skipped 2 of the run's 6 optimizer steps: it made 4 updates" in caplog.text
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["_SkippedUpdates"]["args"] == {"count": 2}
    # A resumed run counts on from the checkpoint's skips.
    calls.clear()
    train(tmp_path / "resumed", batch_size=2, accumulation=1, max_steps=6, warmup_steps=2,
          resume=str(tmp_path / "checkpoint-4"))  # fmt: skip
    assert [step for kind, step in calls if kind == "forward"] == [2, 3]


def test_fp16_overflows_stop_training_only_once_the_loss_scale_is_below_1(tmp_path):
    """Before: the first logged step that overflowed (its gradient norm infinite) stopped an fp16 run."""
    trainer = train(tmp_path, batch_size=2, accumulation=1, max_steps=1)
    overflow = {"loss": 2.0, "grad_norm": float("inf")}
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.check_finite(overflow)  # a skipped step: the scale goes on down
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=0.5)
    with pytest.raises(NonFiniteTrainingError, match="grad_norm = inf; fp16's loss scale fell to 0.5"):
        trainer.check_finite(overflow)
    trainer.accelerator.scaler = None  # bf16 or fp32: no scaling, no skipped steps
    with pytest.raises(NonFiniteTrainingError, match="grad_norm = inf"):
        trainer.check_finite(overflow)


def test_auto_find_batch_size_retries_before_the_first_update_and_says_so(tmp_path, monkeypatch, caplog):
    batches = running_out_of_memory_above(monkeypatch, batch_size=2)
    with caplog.at_level("WARNING", logger="modeling_matpac.pretraining.trainer"):
        trainer = train(tmp_path, batch_size=3, accumulation=2, max_steps=3, auto_find_batch_size=True)
    # 3 failed once, int(3 * 0.9) = 2 trained: 2 micro-batches of 2 per update, the schedules from step 0.
    assert batches == [3, 2, 2, 2, 2, 2, 2]
    assert "Out of memory at per-device batch 3 before the first update: training with 2 (4 clips per" in caplog.text
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["ema_decay"] for entry in logged] == pytest.approx([0.5, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3])
    assert trainer.state.train_batch_size == 2 and trainer.state.global_step == 3


def test_auto_find_batch_size_refuses_to_restart_a_run_that_updated(tmp_path, monkeypatch):
    # Before: a second try restarted the EMA, temperature and learning-rate schedules on the trained weights.
    running_out_of_memory_above(monkeypatch, batch_size=2, from_step=2)
    message = (
        "Out of memory at per-device batch 3 after 2 optimizer updates: --auto_find_batch_size would restart the "
        f"schedules on the trained weights. Resume from {tmp_path / 'checkpoint-2'} with a smaller"
    )
    with pytest.raises(BatchTooLargeError, match=re.escape(message)):
        train(tmp_path, batch_size=3, accumulation=1, max_steps=4, save_steps=1, auto_find_batch_size=True)


def test_auto_find_batch_size_is_refused_with_several_processes(tmp_path):
    args = TrainingArguments(tmp_path, use_cpu=True, report_to=[], auto_find_batch_size=True)
    check_supported_arguments(args)
    with mock.patch.object(TrainingArguments, "world_size", new_callable=mock.PropertyMock, return_value=2):
        with pytest.raises(ValueError, match="retries with a smaller batch in the process that ran out of memory"):
            check_supported_arguments(args)


@HYPOTHESES
def test_bf16_autocast_keeps_teachers_and_centre_in_fp32(tmp_path, num_hypotheses):
    trainer = train(tmp_path, batch_size=2, accumulation=1, max_steps=2, bf16=True, num_hypotheses=num_hypotheses)
    model = trainer.pretraining_model
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    assert model.center.dtype == torch.float32 and torch.count_nonzero(model.center) > 0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    fp32 = train(tmp_path / "fp32", batch_size=2, accumulation=1, max_steps=2, num_hypotheses=num_hypotheses)
    fp32_losses = [entry["loss"] for entry in fp32.state.log_history if "loss" in entry]
    # Autocast really ran in bf16 (the losses differ) and stayed close to fp32.
    assert losses != fp32_losses
    assert losses == pytest.approx(fp32_losses, rel=0.05)


def _decayed_numel(optimizer) -> dict[float, int]:
    """Parameters per weight-decay value of the optimizer's groups."""
    counts = {}
    for group in optimizer.param_groups:
        counts[group["weight_decay"]] = counts.get(group["weight_decay"], 0) + sum(p.numel() for p in group["params"])
    return counts


def test_weight_decay_covers_every_parameter_like_the_authors_adam(tmp_path):
    from pretraining_worker import tiny_model

    args = TrainingArguments(tmp_path, use_cpu=True, report_to=[], weight_decay=0.05)
    model = tiny_model()
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    spared = {
        name: numel
        for name, numel in trainable.items()
        if name.endswith(".bias") or "layernorm" in name or name.split(".")[-2] in ("norm", "layernorm")
    }
    head_weight_norm = [name for name in trainable if ".parametrizations.weight.original" in name]
    assert len(head_weight_norm) == 2  # weight_g and weight_v of the student head's last layer

    authors = MatpacTrainer(model=model, args=args)
    assert set(authors.get_decay_parameter_names(model)) >= set(trainable)
    assert _decayed_numel(authors.create_optimizer()) == {0.05: sum(trainable.values()), 0.0: 0}

    usual = MatpacTrainer(model=tiny_model(), args=args, weight_decay_set="transformers")
    names = set(usual.get_decay_parameter_names(usual.model))
    assert not names & spared.keys() and set(head_weight_norm) <= names
    assert _decayed_numel(usual.create_optimizer()) == {
        0.05: sum(trainable.values()) - sum(spared.values()),
        0.0: sum(spared.values()),
    }

    # ViT-B: the Trainer's rule spares 182,016 of the 118,084,608 trainable parameters.
    with torch.device("meta"):
        base = MatpacForPreTraining(MatpacConfig())
    sizes = {name: p.numel() for name, p in base.named_parameters() if p.requires_grad}
    assert sum(sizes.values()) == 118_084_608
    decayed = sum(sizes[name] for name in usual.get_decay_parameter_names(base) if name in sizes)
    assert sum(sizes.values()) - decayed == 182_016
    assert sum(sizes[name] for name in authors.get_decay_parameter_names(base) if name in sizes) == 118_084_608
    with pytest.raises(ValueError, match="weight_decay_set must be one of"):
        MatpacTrainer(model=tiny_model(), args=args, weight_decay_set="none")


@pytest.mark.parametrize(("num_workers", "accumulation"), [(0, 1), (2, 2)])
def test_skip_counts_reach_the_logs_beside_the_batches_and_survive_a_resume(tmp_path, num_workers, accumulation):
    import numpy as np
    import soundfile as sf

    from modeling_matpac.pretraining.data import SKIP_COUNTERS, MatpacPretrainingDataset, list_audio_files

    generate_builtin_corpus(tmp_path / "corpus", num_clips=6)
    for index in range(2):
        sf.write(tmp_path / "corpus" / f"short{index}.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "corpus" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    files = list_audio_files(tmp_path / "corpus")
    # The expected running totals, from the examples themselves: batch b comes from worker b % W.
    consumers = [
        iter(MatpacPretrainingDataset(files, seed=1, rank=worker, world_size=max(num_workers, 1)))
        for worker in range(max(num_workers, 1))
    ]
    batches = []
    for index in range(4 * accumulation):
        examples = [next(consumers[index % len(consumers)]) for _ in range(2)]
        batches.append([sum(example[name] for example in examples) for name in SKIP_COUNTERS])
    expected = [tuple(map(sum, zip(*batches[: step * accumulation]))) for step in range(1, 5)]
    assert expected[-1][0] >= 2 and expected[-1][1] >= 1  # 4 or 8 batches of 2 crops reach a second epoch

    def run(output_dir, **kwargs):
        trainer = train(
            output_dir,
            batch_size=2,
            accumulation=accumulation,
            max_steps=4,
            dataset=MatpacPretrainingDataset(files, seed=1),
            dataloader_num_workers=num_workers,
            **kwargs,
        )
        return [
            (entry["num_skipped_short"], entry["num_skipped_corrupt"])
            for entry in trainer.state.log_history
            if "loss" in entry
        ]

    assert run(tmp_path / "straight", save_steps=2) == expected
    checkpoint = str(tmp_path / "straight" / "checkpoint-2")
    # Steps 1-2 restored from the checkpoint's log history, steps 3-4 logged again.
    assert run(tmp_path / "resumed", resume=checkpoint) == expected
    # With the data started over, the counts start over too (run_pretraining.py says so).
    assert run(tmp_path / "restarted", resume=checkpoint, ignore_data_skip=True) == expected[:2] * 2


class CropsWithoutNoise(FixedCrops):
    """Crops that leave the masking to the model's random noise."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_values": self.values[index]}


def test_evaluation_masks_with_its_own_noise_and_leaves_the_training_as_it_was(tmp_path):
    """Before: evaluation drew its masks from the global generator: its losses varied and the training changed."""
    plain = train(tmp_path / "plain", batch_size=2, accumulation=1, max_steps=4, dataset=CropsWithoutNoise())
    evaluated = train(
        tmp_path / "evaluated", batch_size=2, accumulation=1, max_steps=4, dataset=CropsWithoutNoise(),
        eval_dataset=CropsWithoutNoise(4), eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2,
    )  # fmt: skip
    assert logged_losses(evaluated.state.log_history) == logged_losses(plain.state.log_history)
    assert max_difference(evaluated.pretraining_model.state_dict(), plain.pretraining_model.state_dict()) == 0
    during = [entry["eval_loss"] for entry in evaluated.state.log_history if "eval_loss" in entry]
    assert len(during) == 2 and during[0] != during[1]  # the model changed between them
    after = [evaluated.evaluate() for _ in range(2)]
    assert after[0]["eval_loss"] == after[1]["eval_loss"] == during[1]
    # The two parts are reported beside the loss (before: eval_loss only), averaged over the same clips.
    assert after[0]["eval_loss_pred"] == after[1]["eval_loss_pred"] and 0 < after[0]["eval_loss_pred"] < 4
    parts = 0.5 * after[0]["eval_loss_pred"] + 0.5 * after[0]["eval_loss_cls"]
    assert after[0]["eval_loss"] == pytest.approx(parts, abs=1e-6)


def test_datasets_that_cannot_work_are_refused_before_training(tmp_path, caplog):
    files = [str(path) for path in generate_builtin_corpus(tmp_path / "corpus", num_clips=4)]
    args = TrainingArguments(tmp_path / "out", max_steps=2, report_to=[], use_cpu=True, eval_strategy="steps")
    model = MatpacForPreTraining(MatpacConfig(**tiny_config_kwargs()))
    # Before: evaluation on an infinite dataset never returned.
    endless = MatpacPretrainingDataset(files)
    with pytest.raises(ValueError, match=r"evaluation dataset repeats forever .* `infinite=False`"):
        MatpacTrainer(model=model, args=args, train_dataset=endless, eval_dataset=endless)
    # Before: a dataset normalised with other statistics trained without a word.
    other_front_end = MatpacPretrainingDataset(files, feature_extractor=MatpacFeatureExtractor(mean=-4.0, f_max=7000))
    trainer = MatpacTrainer(model=model, args=TrainingArguments(tmp_path / "out", max_steps=2, report_to=[],
                            use_cpu=True), train_dataset=other_front_end)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"another input than the model's: f_max 7000.* lms_mean -4.0 \(model: -7.056"
    ):
        trainer.train()
    shorter_crops = MatpacPretrainingDataset(files, num_frames=304)
    with pytest.raises(ValueError, match=r"num_frames 304 \(model: 608\)"):
        MatpacTrainer(model=model, args=args, train_dataset=shorter_crops, eval_dataset=shorter_crops)


@pytest.mark.parametrize("max_steps", [2, 3])
def test_a_teacher_temperature_warm_up_longer_than_the_run_is_said(tmp_path, caplog, max_steps):
    with caplog.at_level("WARNING", logger="modeling_matpac.pretraining.trainer"):
        train(tmp_path, batch_size=2, accumulation=1, max_steps=max_steps)  # the tiny model warms up over 2 steps
    warnings = [record.getMessage() for record in caplog.records if "warms up" in record.getMessage()]
    if max_steps == 2:
        assert warnings == [
            "The teacher temperature warms up over 2 steps (config.teacher_temperature_warmup_steps) and this run "
            "has 2: it ends at 0.0550 instead of 0.07. Set the warm-up in steps of this run (the recipe's is 10 "
            "epochs)."
        ]
    else:
        assert warnings == []


def test_the_saved_model_carries_the_feature_extractor_of_its_config(tmp_path):
    """Before: without `processing_class`, AutoFeatureExtractor could not load what `save_model` wrote."""
    trainer = train(tmp_path, batch_size=2, accumulation=1, max_steps=1)
    trainer.save_model()
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    expected = MatpacFeatureExtractor.from_model_config(trainer.pretraining_model.config)
    assert {key: value for key, value in loaded.to_dict().items() if key != "auto_map"} == expected.to_dict()
