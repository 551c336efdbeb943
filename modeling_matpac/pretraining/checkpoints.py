"""
Which checkpoint of a run can be resumed: the Trainer writes a checkpoint's files one after the other, so a run
stopped (killed, out of disk) while saving leaves a folder that looks like a checkpoint and is not one.
"""

import json
import logging
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """
    Why `checkpoint` cannot be resumed from, `None` if it can. The Trainer saves the weights, then the optimizer and
    scheduler states, then trainer_state.json: a run stopped while saving leaves no valid state file, and a folder
    with a state file but no optimizer state is a final model or a `--save_only_model` checkpoint, from which the
    Trainer would silently restart AdamW's moments and the learning-rate schedule.
    """
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (the run was stopped while saving it)"
    try:
        recorded = json.loads(state.read_text())
    except ValueError:
        return "its trainer_state.json is empty or truncated (the run was stopped while saving it)"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("global_step"), int):
        return "its trainer_state.json records no global_step"
    if not (checkpoint / "config.json").is_file():
        return "it has no config.json"
    if not any((checkpoint / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return "it has no model weights"
    missing = [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME) if not (checkpoint / name).is_file()]
    if missing:
        return (
            f"it has no {' or '.join(missing)} (a final model folder, or a checkpoint saved with --save_only_model), "
            "so resuming would restart AdamW's moments and the learning-rate schedule"
        )
    return _unreadable_file(checkpoint)


def _unreadable_file(checkpoint: Path) -> str | None:
    """
    A damaged file of a checkpoint, read as far as it can be without loading it: the header of the safetensors
    weights, and the archive index of the torch files (written last, so a truncated file has none).
    """
    for weights in checkpoint.glob("*.safetensors"):
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"its {weights.name} is damaged ({str(error).strip().splitlines()[0]})"
    for name in [OPTIMIZER_NAME, SCHEDULER_NAME, *(path.name for path in checkpoint.glob("rng_state*.pth"))]:
        try:
            with zipfile.ZipFile(checkpoint / name):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"its {name} is damaged or truncated"
    return None


def checkpoint_steps(output_dir: Path) -> dict[Path, int]:
    """The checkpoint folders of `output_dir` (`checkpoint-<step>`), complete or not, with their steps."""
    checkpoints = output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if output_dir.is_dir() else []
    steps = {path: path.name.rsplit("-", 1)[-1] for path in checkpoints if path.is_dir()}
    return {path: int(step) for path, step in steps.items() if step.isdigit()}


def last_complete_checkpoint(output_dir: Path, warn: bool = False) -> Path | None:
    """The complete checkpoint of `output_dir` with the most steps (`warn`: log why each later one is not)."""
    steps = checkpoint_steps(output_dir)
    for checkpoint in sorted(steps, key=lambda path: -steps[path]):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        if warn:
            logger.warning("Skipping the incomplete checkpoint %s: %s.", checkpoint, problem)
    return None
