"""
Class names of the authors' released heads, read from the label maps shipped in `label_maps/` (see its README for
their source). Output `i` of a released head is named as the authors' inference code names it, which for AudioSet is
not the dataset's own index order.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path


LABEL_MAP_DIR = Path(__file__).parent / "label_maps"


@dataclass(frozen=True)
class LabelMap:
    """A released head's vocabulary: its file in `label_maps/`, its size and whether a clip can have several labels."""

    file: str
    num_labels: int
    multi_label: bool
    title: str


LABEL_MAPS = {
    "audioset": LabelMap("audioset_mapping.csv", 527, True, "AudioSet"),
    "esc50": LabelMap("esc50_mapping.json", 50, False, "ESC-50"),
    "fsd50k": LabelMap("fsd50k_mapping.csv", 200, True, "FSD50K"),
    "openmic": LabelMap("openmic_mapping.json", 20, True, "OpenMIC-2018"),
    "mtg_genre": LabelMap("mtg_genre_mapping.json", 87, True, "MTG-Jamendo genre"),
    "mtg_instrument": LabelMap("mtg_instrument_mapping.json", 40, True, "MTG-Jamendo instrument"),
    "mtg_mood": LabelMap("mtg_mood_mapping.json", 56, True, "MTG-Jamendo mood/theme"),
    "mtg_top50": LabelMap("mtg_top50_mapping.json", 50, True, "MTG-Jamendo top-50"),
}
# The tasks of the authors' downstream probes (`Weights_probes_matpac.zip`).
PROBE_TASKS = tuple(name for name in LABEL_MAPS if name != "audioset")


def _read(path: Path) -> dict[int, str]:
    """Index -> name as the authors' inference code builds it from each file's layout."""
    if path.suffix == ".json":
        entries = json.loads(path.read_text(encoding="utf-8"))
        if all(key.isdigit() for key in entries):  # {"target": "name"} (ESC-50)
            return {int(index): name for index, name in entries.items()}
        return {int(index): name for name, index in entries.items()}  # {"name": index}
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    if rows[0] == ["index", "mid", "display_name"]:  # AudioSet: outputs follow the classes sorted by mid
        by_mid = sorted(rows[1:], key=lambda row: row[1])
        return {index: row[2] for index, row in enumerate(by_mid)}
    return {int(row[0]): row[1] for row in rows}  # FSD50K: index, name, mid


def load_labels(task: str) -> list[str]:
    """Names of the outputs of the authors' `task` head, output 0 first."""
    if task not in LABEL_MAPS:
        raise ValueError(f"Unknown task {task!r}; the released heads are for {', '.join(LABEL_MAPS)}.")
    label_map = LABEL_MAPS[task]
    names = _read(LABEL_MAP_DIR / label_map.file)
    if sorted(names) != list(range(label_map.num_labels)):
        raise ValueError(
            f"{label_map.file} does not name outputs 0..{label_map.num_labels - 1} once each "
            f"({len(names)} entries): the shipped label map is damaged."
        )
    return [names[index] for index in range(label_map.num_labels)]
