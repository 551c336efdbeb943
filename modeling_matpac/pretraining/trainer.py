"""A `Trainer` that owns MATPAC's teachers: EMA teacher encoder and head, and the centre, once per optimizer step."""

import logging
import math
import shutil
import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from ..configuration_matpac import FRONT_END_FIELDS
from ..feature_extraction_matpac import MatpacFeatureExtractor
from ..modeling_matpac import MatpacForPreTraining
from .checkpoints import checkpoint_problem, last_complete_checkpoint
from .data import SKIP_COUNTERS, MatpacPretrainingDataset, SkippedClips, collate_pretraining_batch


logger = logging.getLogger(__name__)

# Detached model outputs averaged into the logs like `loss` (over micro-batches and steps, then over processes). The
# MATPAC++ ones are absent for MATPAC; a vector is logged per entry (`mcl_win_share_0`, ...).
LOGGED_OUTPUTS = ("loss_pred", "loss_cls", "teacher_temperature", "mcl_temperature", "mcl_win_share")
# Which parameters get weight decay: "all" (the authors' fairseq Adam) or "transformers" (the Trainer's rule, which
# spares biases and LayerNorm weights).
WEIGHT_DECAY_SETS = ("all", "transformers")


def check_supported_arguments(args) -> None:
    """
    Refuses `TrainingArguments` that would silently do something else in MATPAC pre-training: `fp16` on the CPU
    (accelerate has no fp16 autocast there: fp32), and the language-model options, which have nothing to act on or
    would act on the patch embeddings.
    """
    if args.fp16 and args.device.type == "cpu":
        raise ValueError("--fp16 needs a CUDA GPU: on the CPU it would train in fp32. Use --bf16 or leave it out.")
    if args.label_smoothing_factor != 0:
        raise ValueError("--label_smoothing_factor has no labels to smooth in MATPAC pre-training: leave it at 0.")
    if args.neftune_noise_alpha is not None:
        raise ValueError(
            "--neftune_noise_alpha adds noise to a language model's token embeddings; here it would noise the patch "
            "embeddings of every training step. Leave it out."
        )
    if args.use_liger_kernel:
        raise ValueError("--use_liger_kernel patches language-model layers, which MATPAC does not have: leave it out.")
    if args.auto_find_batch_size and args.world_size > 1:
        raise ValueError(
            "--auto_find_batch_size retries with a smaller batch in the process that ran out of memory alone, while "
            "the others wait for it in their gradient all-reduce: find the batch on one process, then set "
            "--per_device_train_batch_size."
        )


def _ignore_termination(worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NonFiniteTrainingError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite: training stops before saving them."""


class BatchTooLargeError(RuntimeError):
    """The batch ran out of memory after training began, where `--auto_find_batch_size` cannot just try again."""


def _checkpoint_record(state: TrainerState, record: ExportableState) -> dict:
    """
    What `record` (a callback that keeps part of the run in each checkpoint) held when the resumed checkpoint was
    saved: its `state()["args"]`, empty for a new run or a checkpoint from before the record.
    """
    return state.stateful_callbacks.get(type(record).__name__, {}).get("args", {})


class _TeacherUpdateCallback(TrainerCallback):
    """Runs the teacher and centre updates between the backward and `optimizer.step()` (the authors' timing)."""

    def __init__(self, trainer: "MatpacTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.reset_accumulators(state.global_step)
        logger.info("The teachers' EMA decays anneal over the whole run: %d steps.", state.max_steps)
        model = self.trainer.pretraining_model
        warmup = model.config.teacher_temperature_warmup_steps
        if warmup >= state.max_steps:
            logger.warning(
                "The teacher temperature warms up over %d steps (config.teacher_temperature_warmup_steps) and this "
                "run has %d: it ends at %.4f instead of %s. Set the warm-up in steps of this run (the recipe's is 10 "
                "epochs).",
                warmup,
                state.max_steps,
                float(model.teacher_temperature(state.max_steps - 1)),
                model.config.teacher_temperature,
            )
        first_hard_step = model.mcl_first_hard_step()
        if model.config.predictor_num_hypotheses > 1 and first_hard_step >= state.max_steps:
            logger.info(
                "MATPAC++: the hard winner-takes-all phase starts %s, not within this run's %d steps: every step "
                "trains with the annealed soft assignment.",
                "never" if math.isinf(first_hard_step) else f"at update {first_hard_step}",
                state.max_steps,
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.update_teachers_and_center(self.trainer.schedule_step)

    def on_step_end(self, args, state, control, **kwargs):
        # A step that logs is checked by `log`, which the Trainer calls before it saves.
        if (control.should_save or control.should_training_stop) and not control.should_log:
            self.trainer.check_finite()


class _GlobalBatchRecord(TrainerCallback, ExportableState):
    """
    Keeps the run's global batch (clips per optimizer step) in each checkpoint's trainer state, and warns when a run
    resumes with another: its schedules go on in steps, each of another number of clips, which the Trainer does not
    mention.
    """

    def __init__(self, size: int | None = None):
        self.size = size  # set when training begins

    def state(self) -> dict:
        return {"args": {"size": self.size}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        recorded = _checkpoint_record(state, self).get("size")
        if recorded is not None and recorded != self.size:
            logger.warning(
                "This run resumes at step %d with a global batch of %d clips (%d per device x %d accumulation steps "
                "x %d processes); the checkpoint's run had %d. Its schedules go on in steps of %d clips.",
                state.global_step,
                self.size,
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps,
                args.world_size,
                recorded,
                self.size,
            )
        state.stateful_callbacks[type(self).__name__] = self.state()


class _ScheduleRecord(TrainerCallback, ExportableState):
    """
    Keeps the run's length and learning-rate schedule in each checkpoint's trainer state, and warns when a run resumes
    with another: the learning rate and the EMA decays are functions of the step and of the run's length, so they bend
    at the resumed step (how a run is extended), which the Trainer does not mention.
    """

    def __init__(self, **settings):
        self.settings = settings  # set when training begins

    def state(self) -> dict:
        return {"args": self.settings, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.settings = {
            "max_steps": state.max_steps,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
        }
        recorded = _checkpoint_record(state, self)
        differences = [
            f"{key} {recorded[key]!r} (now {value!r})"
            for key, value in self.settings.items()
            if recorded.get(key) is not None and recorded[key] != value
        ]
        if differences:
            logger.warning(
                "This run resumes at step %d of a run with another schedule: %s. The learning rate and the teachers' "
                "EMA decays follow this run's schedule from that step on; the run is not the one an uninterrupted run "
                "of either schedule would give.",
                state.global_step,
                ", ".join(differences),
            )
            scale = args.learning_rate / (recorded.get("learning_rate") or args.learning_rate)
            self.restart_learning_rate(kwargs.get("lr_scheduler"), kwargs.get("optimizer"), scale)
        state.stateful_callbacks[type(self).__name__] = self.state()

    @staticmethod
    def restart_learning_rate(scheduler, optimizer, scale: float) -> None:
        """
        Sets the resumed run's learning rate from its own schedule and peak rate, as fairseq recomputes it when a run
        is loaded. The checkpoint's scheduler state brings back the former peak rate (`base_lrs`), which the whole run
        would have kept, and its optimizer state the former rate, which the first update would have used.
        """
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or optimizer is None:
            return
        scheduler.base_lrs = [base * scale for base in scheduler.base_lrs]
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, base, rate in zip(optimizer.param_groups, scheduler.base_lrs, rates, strict=True):
            group["initial_lr"], group["lr"] = base, rate
        scheduler._last_lr = rates  # what the Trainer logs as the step's learning rate


class _SkippedUpdates(TrainerCallback, ExportableState):
    """
    Counts the optimizer steps that fp16's loss scaling skipped (an overflow in the gradients), kept in each
    checkpoint. The Trainer counts them as steps but does not advance the learning rate for them; the other schedules
    (EMA decays, temperatures) take the step `global_step - count`, so that all of them follow the updates made, as
    in fairseq, where a skipped step counts for nothing.
    """

    def __init__(self, count: int = 0):
        self.count = count

    def state(self) -> dict:
        return {"args": {"count": self.count}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.count = _checkpoint_record(state, self).get("count", 0)
        state.stateful_callbacks[type(self).__name__] = self.state()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):
            self.count += 1
            logger.info(
                "Step %d: the optimizer step was skipped (fp16 gradient overflow; %d so far): the schedules wait.",
                state.global_step,
                self.count,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.count:
            logger.warning(
                "fp16's loss scaling skipped %d of the run's %d optimizer steps: it made %d updates, and its "
                "schedules stopped %d steps short of their end. bf16, where the GPU has it, skips none.",
                self.count,
                state.global_step,
                state.global_step - self.count,
                self.count,
            )


class MatpacTrainer(Trainer):
    """
    Trains [`MatpacForPreTraining`] with the standard `Trainer` loop. Per optimizer step, after the backward of the
    last micro-batch: the centre moves toward the teacher statistics summed over all micro-batches and processes,
    then each teacher moves toward the student weights that produced the step's loss (skipped at step 0). Every
    process applies the same update, so teachers and centre stay identical under DDP. The schedules are functions of
    the updates made (`schedule_step`: `state.global_step`, less the steps fp16 skipped) and `state.max_steps` (the
    EMA decays anneal over the run, whatever the saved config's `ema_anneal_end_step`), so a resumed run needs nothing
    beyond the model's state dict and the trainer state.

    A [`MatpacPretrainingDataset`] (or log-mel cache) must be infinite and split for this process (`rank`,
    `world_size`); its loader counts the clips the pipeline skipped (`SkippedClips`), logged as running totals.

    Single device and DDP are supported (with bf16/fp16 autocast: the teachers and the centre stay fp32). FSDP and
    DeepSpeed are refused: the EMA would see sharded or partitioned parameters.

    Weight decay applies to every trainable parameter, as in the authors' fairseq Adam (biases, LayerNorm weights and
    the weight-normalised heads' magnitude `weight_g` included); `weight_decay_set="transformers"` keeps the
    `Trainer`'s set instead, which spares biases and LayerNorm weights (182,016 of ViT-B's 118.08 M parameters).
    """

    def __init__(self, *args, weight_decay_set: str = "all", **kwargs):
        if weight_decay_set not in WEIGHT_DECAY_SETS:
            raise ValueError(f"weight_decay_set must be one of {WEIGHT_DECAY_SETS}, got {weight_decay_set!r}.")
        self.weight_decay_set = weight_decay_set
        super().__init__(*args, **kwargs)
        # A NaN loss must stop the run (see `check_finite`), not be logged as the previous mean (0 after a log).
        self.args.logging_nan_inf_filter = False
        self.check_supported_setup()
        if self.processing_class is None:  # saved beside every checkpoint: the folder then loads as a whole model
            self.processing_class = MatpacFeatureExtractor.from_model_config(self.pretraining_model.config)
        if self.args.eval_strategy != "no" and self.eval_dataset is not None:
            eval_sets = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
            for dataset in eval_sets:
                self.check_dataset(dataset, "evaluation")
        self._eval_noise: torch.Generator | None = None
        self._attempts: list[int] = []  # the per-device batch of each try of `--auto_find_batch_size`, in `train`
        self._updates_this_call = 0  # optimizer updates of the `train` call under way, over its tries
        self._last_update_step = 0  # the schedules' step of the last teacher update
        self._eval_loss_parts: list[torch.Tensor] = []  # per clip, of the evaluation under way
        self.skipped_clips: SkippedClips | None = None  # set with the loader of a MatpacPretrainingDataset
        self.workers_ignore_sigterm = False  # see `get_train_dataloader`
        self.reset_accumulators(self.state.global_step)
        self.add_callback(_TeacherUpdateCallback(self))
        self.add_callback(_GlobalBatchRecord())
        self.add_callback(_ScheduleRecord())
        self.add_callback(_SkippedUpdates())

    def _build_accelerator_args(self, **kwargs) -> dict:
        """
        DDP without `find_unused_parameters`, which the Trainer turns on for a model without activation checkpointing:
        every student parameter takes part in the loss (the teachers need no gradients), and the search for unused
        ones walks the autograd graph at every step.
        """
        if self.args.ddp_find_unused_parameters is None:
            self.args.ddp_find_unused_parameters = False
        return super()._build_accelerator_args(**kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs) -> TrainOutput:
        """
        The Trainer's `train`. A checkpoint that already holds the run's `max_steps` (a run stopped while it wrote its
        final model, or a job run again) is loaded and not trained on: the Trainer would train one step past the end.
        """
        self._attempts, self._updates_this_call = [], 0
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if (
            resume_from_checkpoint
            and self.args.max_steps > 0
            and checkpoint_problem(Path(resume_from_checkpoint)) is None
        ):
            state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE_NAME))
            if state.global_step >= self.args.max_steps:
                logger.warning(
                    "%s holds step %d of this run's %d: nothing to train, the model is the checkpoint's.",
                    resume_from_checkpoint,
                    state.global_step,
                    self.args.max_steps,
                )
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, math.nan, {"epoch": state.epoch})
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _inner_training_loop(self, batch_size=None, *args, **kwargs):
        """
        One try of the training loop. `--auto_find_batch_size` tries again with a smaller batch after running out of
        memory; after an optimizer update that would restart the schedules (EMA, temperatures, learning rate) from
        step 0 on weights and teachers already trained, so it is refused, naming the checkpoint to resume from.
        """
        self._attempts.append(batch_size)
        if len(self._attempts) > 1:
            if self._updates_this_call:
                checkpoint = last_complete_checkpoint(Path(self.args.output_dir))
                raise BatchTooLargeError(
                    f"Out of memory at per-device batch {self._attempts[-2]} after {self._updates_this_call} "
                    "optimizer updates: --auto_find_batch_size would restart the schedules on the trained weights. "
                    f"Resume from {checkpoint or 'the last checkpoint'} with a smaller --per_device_train_batch_size."
                )
            logger.warning(
                "Out of memory at per-device batch %d before the first update: training with %d (%d clips per "
                "optimizer step). The learning rate and schedules are not rescaled.",
                self._attempts[-2],
                batch_size,
                batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            )
        return super()._inner_training_loop(batch_size, *args, **kwargs)

    @property
    def schedule_step(self) -> int:
        """The step of the schedules: optimizer updates made, the steps fp16 skipped left out (`_SkippedUpdates`)."""
        # Looked up, not kept: resuming, the Trainer replaces its stateful callbacks with new ones from the checkpoint.
        skipped = next(
            callback for callback in self.callback_handler.callbacks if isinstance(callback, _SkippedUpdates)
        )
        return self.state.global_step - skipped.count

    def reset_accumulators(self, global_step: int) -> None:
        """Starts the centre statistics and the logged averages afresh (at the start or the resumption of a run)."""
        self._teacher_sum: torch.Tensor | None = None
        self._teacher_count: torch.Tensor | None = None
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_counts: dict[str, int] = {}
        self._loss_is_finite: torch.Tensor | None = None
        # The loader's first batch is the one of this step, unless Trainer replays the batches before it.
        self._first_step_of_loader = global_step if self.args.ignore_data_skip else 0

    def check_supported_setup(self) -> None:
        check_supported_arguments(self.args)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "MatpacTrainer supports single-device and DDP training only: the teacher EMA is not implemented for "
                "FSDP or DeepSpeed parameter sharding. Launch with plain DDP (`accelerate launch` without an FSDP or "
                "DeepSpeed config)."
            )
        ignored = [name for name in ("compute_metrics", "preprocess_logits_for_metrics") if getattr(self, name)]
        if ignored:
            raise ValueError(
                f"MatpacTrainer does not take {' or '.join(ignored)}: pre-training has no labels or logits to score, "
                "and its evaluation reports the pre-training loss and its parts (`eval_loss`, `eval_loss_pred`, "
                "`eval_loss_cls`)."
            )
        if not isinstance(self.pretraining_model, MatpacForPreTraining):
            raise ValueError(
                f"MatpacTrainer trains a MatpacForPreTraining, got {type(self.pretraining_model).__name__}."
            )

    def check_dataset(self, dataset: object, use: str) -> None:
        """
        A `MatpacPretrainingDataset` must compute the model's own input (front end and crop length: a model saved
        with another front end would normalise its users' audio differently), and an evaluation one must end.
        """
        if not isinstance(dataset, MatpacPretrainingDataset):
            return
        config = self.pretraining_model.config
        differences = [
            f"{field} {getattr(dataset.feature_extractor, argument)!r} (model: {getattr(config, field)!r})"
            for field, argument in FRONT_END_FIELDS.items()
            if getattr(dataset.feature_extractor, argument) != getattr(config, field)
        ]
        if dataset.num_frames != config.num_frames:
            differences.append(f"num_frames {dataset.num_frames} (model: {config.num_frames})")
        if differences:
            raise ValueError(
                f"The {use} dataset computes another input than the model's: {', '.join(differences)}. Build it with "
                "`feature_extractor=MatpacFeatureExtractor.from_model_config(model.config)` and "
                "`num_frames=model.config.num_frames`."
            )
        if use == "evaluation" and dataset.infinite:
            raise ValueError(
                "The evaluation dataset repeats forever (`infinite=True`), so evaluation would never end: build it "
                "with `infinite=False` (one crop per clip)."
            )

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        if self.weight_decay_set == "transformers":
            return super().get_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters()]

    @property
    def pretraining_model(self) -> MatpacForPreTraining:
        return self.accelerator.unwrap_model(self.model)

    def get_train_dataloader(self) -> DataLoader:
        """
        A `MatpacPretrainingDataset` splits itself among processes (and their workers): every process reads and
        decodes only its own share, instead of process 0 reading for all and broadcasting each batch. Its loader is
        therefore not handed to accelerate, which would shard or dispatch it a second time; its collate function
        counts the skipped clips beside the batches. With `workers_ignore_sigterm` (set by a caller that stops on
        SIGTERM with a checkpoint, as `run_pretraining.py` does) its workers ignore SIGTERM, which a cluster sends to
        every process of a job it stops: a worker killed by it would end the parent before it saved. That caller
        must then end them itself when it exits on an error: Python's exit ends them with SIGTERM.
        """
        dataset = self.train_dataset
        if not isinstance(dataset, MatpacPretrainingDataset):
            return super().get_train_dataloader()
        self.check_dataset(dataset, "training")
        args = self.args
        if (dataset.rank, dataset.world_size) != (args.process_index, args.world_size):
            raise ValueError(
                f"The dataset reads the share of process {dataset.rank} of {dataset.world_size}, but this is process "
                f"{args.process_index} of {args.world_size}: build it with `rank=args.process_index, "
                "world_size=args.world_size`."
            )
        if not dataset.infinite or not args.dataloader_in_order:
            raise ValueError(
                "MatpacTrainer reads a MatpacPretrainingDataset as an infinite stream (`infinite=True`, with "
                "`max_steps`) of batches in order (`dataloader_in_order=True`)."
            )
        self.skipped_clips = SkippedClips(
            self.data_collator or collate_pretraining_batch,
            args.dataloader_num_workers,
            args.dataloader_multiprocessing_context,
        )
        return DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.skipped_clips,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            worker_init_fn=_ignore_termination if self.workers_ignore_sigterm else None,
        )

    def get_eval_dataloader(self, eval_dataset: str | object | None = None) -> DataLoader:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        self.check_dataset(self.eval_dataset[dataset] if isinstance(dataset, str) else dataset, "evaluation")
        return super().get_eval_dataloader(eval_dataset)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """
        Each evaluation masks its batches with the same noise, from a generator of its own, so the losses of two
        evaluations compare; and it leaves the random state as it found it (its loader draws a seed), so a run that
        evaluates trains as the same run without evaluation.
        """
        device = self.args.device
        self._eval_noise = torch.Generator(device).manual_seed(self.args.seed + self.args.process_index)
        accelerators = [device] if device.type != "cpu" else []
        try:
            with torch.random.fork_rng(devices=accelerators, device_type=device.type):
                return super().evaluate(*args, **kwargs)
        finally:
            self._eval_noise = None

    def _save_checkpoint(self, model, trial) -> None:
        """
        A checkpoint that cannot be written is an `OSError`, as for any other file: `torch.save` (the optimizer,
        scheduler and random states) reports a full disk as a `RuntimeError` of its zip writer instead.
        """
        try:
            super()._save_checkpoint(model, trial)
        except RuntimeError as error:
            if isinstance(error, torch.distributed.DistError):
                raise
            free = shutil.disk_usage(self.args.output_dir).free / 2**20
            raise OSError(
                f"Writing checkpoint-{self.state.global_step} failed: {str(error).strip().splitlines()[-1]} "
                f"({free:,.0f} MB free on its disk)"
            ) from error

    def _prepare_input(self, data):
        """
        Copies the batch to the device without making the host wait for the copy: from the loader's pinned memory
        (`dataloader_pin_memory`, on by default) the step then has no host-device synchronisation. `Trainer`'s own
        copy is blocking, one synchronisation per micro-batch (seen with `torch.cuda.set_sync_debug_mode`).
        """
        if isinstance(data, torch.Tensor):
            return data.to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The step as a device tensor: a compiled forward neither recompiles per step nor waits for the host.
        step = torch.full((), self.schedule_step, device=inputs["input_values"].device)
        outputs = model(
            input_values=inputs["input_values"],
            noise=inputs.get("noise"),
            step=step,
        )
        if model.training:
            self._accumulate(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _step_will_be_logged(self) -> bool:
        """Whether the optimizer step under way ends with a log (the test of `DefaultFlowCallback.on_step_end`)."""
        args, step = self.args, self.state.global_step + 1
        if args.logging_strategy != "steps":
            return True
        return (step == 1 and args.logging_first_step) or step % self.state.logging_steps == 0

    def _accumulate(self, outputs) -> None:
        """Sums the step's centre statistics and the values to log, as the Trainer sums `loss`."""
        # On the device, read only when the run is checked: no host sync per micro-batch.
        finite = torch.isfinite(outputs.loss.detach())
        self._loss_is_finite = finite if self._loss_is_finite is None else self._loss_is_finite & finite
        teacher_sum = outputs.teacher_sum.float()
        self._teacher_sum = teacher_sum if self._teacher_sum is None else self._teacher_sum + teacher_sum
        count = outputs.teacher_count.float()
        self._teacher_count = count if self._teacher_count is None else self._teacher_count + count
        logged = {name: value for name in LOGGED_OUTPUTS if (value := getattr(outputs, name)) is not None}
        if self._step_will_be_logged():
            # Only the steps that log pay for the collapse statistics (their micro-batches' average is logged).
            logged.update(self.pretraining_model.collapse_statistics(outputs))
        for name, value in logged.items():
            self._log_sums[name] = self._log_sums.get(name, 0) + value.detach().float()
            self._log_counts[name] = self._log_counts.get(name, 0) + 1

    @torch.no_grad()
    def update_teachers_and_center(self, step: int) -> None:
        """The step's centre statistics, summed over its micro-batches and all processes, to the model's update."""
        teacher_sum = self.accelerator.reduce(self._teacher_sum, reduction="sum")
        teacher_count = self.accelerator.reduce(self._teacher_count, reduction="sum")
        self._teacher_sum = self._teacher_count = None
        self.pretraining_model.update_teachers_and_center(step, teacher_sum, teacher_count, self.state.max_steps)
        self._updates_this_call += 1
        self._last_update_step = step  # what the logs report the decays of

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The Trainer's loop, which reports `eval_loss`, with the loss's two parts beside it, averaged alike."""
        self._eval_loss_parts = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_loss_parts:
            loss_pred, loss_cls = torch.cat(self._eval_loss_parts).double().mean(0).tolist()
            output.metrics[f"{metric_key_prefix}_loss_pred"] = loss_pred
            output.metrics[f"{metric_key_prefix}_loss_cls"] = loss_cls
        self._eval_loss_parts = []
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """
        Evaluation of a label-free objective: the pre-training loss is the metric. Its parts are gathered as the
        Trainer gathers the loss (once per clip, the copies that pad a process's last batch left out).
        """
        inputs = self._prepare_inputs(inputs)
        if inputs.get("noise") is None and self._eval_noise is not None:
            shape = (inputs["input_values"].shape[0], self.pretraining_model.config.num_patches)
            inputs["noise"] = torch.rand(shape, generator=self._eval_noise, device=self._eval_noise.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        parts = torch.stack([outputs.loss_pred, outputs.loss_cls]).float()
        self._eval_loss_parts.append(self.gather_function(parts.repeat(len(inputs["input_values"]), 1)))
        return loss.detach(), None, None

    def check_finite(self, logs: dict[str, float] | None = None) -> None:
        """
        Stops training with `NonFiniteTrainingError` if a loss since the last check, the logged gradient norm or a
        weight is NaN or infinite. Called when the Trainer logs or saves (not per step, to keep host syncs out of
        the hot path), always before it saves: the checkpoints on disk stay the last good ones.

        With fp16 a non-finite loss or gradient norm is what its loss scaling meets now and then: the step is skipped
        (`_SkippedUpdates`) and the scale halved. Training stops only when the scale has fallen below 1, where the
        gradients overflow unscaled: the run has diverged.
        """
        problems = [
            f"{name} = {logs[name]}" for name in ("loss", "grad_norm") if logs and not math.isfinite(logs.get(name, 0))
        ]
        if self._loss_is_finite is not None and not bool(self._loss_is_finite) and not problems:
            problems.append("the loss of a step since the last log is NaN or infinite")
        self._loss_is_finite = None
        scaler = self.accelerator.scaler
        if problems and scaler is not None and scaler.is_enabled():
            if scaler.get_scale() >= 1:
                problems = []
            else:
                problems.append(f"fp16's loss scale fell to {scaler.get_scale():.3g}")
        model = self.pretraining_model
        tensors = [*model.parameters(), *model.buffers()]
        if not torch.stack([torch.isfinite(tensor).all() for tensor in tensors if tensor.is_floating_point()]).all():
            problems.append("weights are NaN or infinite")
        if not problems:
            return
        last = last_complete_checkpoint(Path(self.args.output_dir))
        where, then = (f"the last good checkpoint, {last}", "resume from it") if last else ("the start", "start again")
        raise NonFiniteTrainingError(
            f"Training stopped at step {self.state.global_step}: {'; '.join(problems)}. Nothing was saved after "
            f"{where}. Lower the learning rate or check the data, then {then}."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_sums:
            names = [
                f"{name}_{index}" if value.ndim else name
                for name, value in self._log_sums.items()
                for index in range(value.numel())
            ]
            means = torch.cat([(self._log_sums[name] / self._log_counts[name]).reshape(-1) for name in self._log_sums])
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({name: round(value, 6) for name, value in zip(names, means.tolist())})
            if self.skipped_clips is not None:
                batches = (self.state.global_step - self._first_step_of_loader) * self.args.gradient_accumulation_steps
                counts = torch.tensor(list(self.skipped_clips.totals(batches).values()), device=self.args.device)
                logs.update(zip(SKIP_COUNTERS, self.accelerator.reduce(counts, reduction="sum").tolist()))
            logs["ema_decay"], logs["head_ema_decay"] = self.pretraining_model.ema_decays(
                self._last_update_step, self.state.max_steps
            )
            self._log_sums, self._log_counts = {}, {}
        super().log(logs, start_time)
        if "loss" in logs and self.model.training:
            self.check_finite(logs)
