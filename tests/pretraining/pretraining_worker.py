"""Trains a tiny MATPAC with MatpacTrainer on fixed data and masking; run directly or under `accelerate launch`."""

import argparse
import os
from pathlib import Path

import torch
from conftest import tiny_config_kwargs
from transformers import TrainingArguments, set_seed

from modeling_matpac import MatpacConfig, MatpacForPreTraining
from modeling_matpac.pretraining.data import MatpacPretrainingDataset, collate_pretraining_batch
from modeling_matpac.pretraining.trainer import MatpacTrainer


class FixedCrops(torch.utils.data.Dataset):
    """Log-mel crops with their own masking noise, so that any split of a batch masks the same patches."""

    def __init__(self, size: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.values = torch.randn(size, 80, 608, generator=generator)
        self.noise = torch.rand(size, 190, generator=generator)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_values": self.values[index], "noise": self.noise[index]}


def tiny_model(num_hypotheses: int = 1) -> MatpacForPreTraining:
    """A tiny MATPAC, or MATPAC++ whose multiple-choice loss is soft at steps 0 and 1 and hard from step 2."""
    set_seed(0)
    config = MatpacConfig(
        **tiny_config_kwargs(
            ema_decay=0.5,
            ema_end_decay=0.9,
            head_ema_decay=0.6,
            head_ema_end_decay=0.95,
            teacher_temperature_warmup_steps=2,
            predictor_num_hypotheses=num_hypotheses,
            mcl_temperature_start=0.1,
            mcl_temperature_end=0.03,
            mcl_temperature_decay=0.5,
        )
    )
    return MatpacForPreTraining(config)


def train(
    output_dir,
    batch_size,
    accumulation,
    max_steps,
    save_steps=None,
    resume=None,
    dataset=None,
    collator=None,
    num_hypotheses=1,
    eval_dataset=None,
    callbacks=None,
    **extra,
) -> MatpacTrainer:
    model = tiny_model(num_hypotheses)
    args = TrainingArguments(
        output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=extra.pop("logging_steps", 1),
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        **extra,
    )
    trainer = MatpacTrainer(
        model=model,
        args=args,
        train_dataset=dataset or FixedCrops(),
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class RecordingCollator:
    """Collates pre-training examples and remembers which clips this process consumed."""

    def __init__(self):
        self.clip_ids: list[str] = []

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        self.clip_ids += [example["clip_id"] for example in examples]
        return collate_pretraining_batch(examples)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--audio_dir", help="Train on its wav files and record which clips each process read.")
    parser.add_argument("--num_hypotheses", type=int, default=1)
    arguments = parser.parse_args()
    output_dir = arguments.output_dir
    if arguments.audio_dir:
        # 2 steps of 2 crops per process read exactly one process's share of 8 clips.
        files = sorted(str(path) for path in Path(arguments.audio_dir).glob("*.wav"))
        collator = RecordingCollator()
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        dataset = MatpacPretrainingDataset(files, rank=rank, world_size=world_size)
        trainer = train(output_dir, 2, 1, 2, dataset=dataset, collator=collator)
        torch.save(collator.clip_ids, f"{output_dir}/clips{trainer.args.process_index}.pt")
    else:
        trainer = train(output_dir, batch_size=2, accumulation=1, max_steps=3, num_hypotheses=arguments.num_hypotheses)
    rank = trainer.args.process_index
    state = {name: tensor.clone() for name, tensor in trainer.pretraining_model.state_dict().items()}
    ddp = trainer.model_wrapped
    record = {"state": state, "log_history": trainer.state.log_history, "find_unused": ddp.find_unused_parameters}
    torch.save(record, f"{output_dir}/rank{rank}.pt")
    # As run_pretraining.py does. Left to the interpreter's exit, the gloo group now and then aborted a rank of this
    # worker in the test suite (SIGABRT, "terminate called without an active exception").
    trainer.accelerator.end_training()
