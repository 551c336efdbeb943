"""The model cards: Hub metadata that parses, the paper's numbers as the probing code has them, a fillable template."""

import re
import string
from pathlib import Path

from huggingface_hub import ModelCard

from modeling_matpac.evaluation.tasks import TASKS


CARDS = Path(__file__).resolve().parents[2] / "model_cards"
CARD_DATASETS = {
    "OpenMIC-2018": "openmic",
    "NSynth": "nsynth",
    "GTZAN": "gtzan",
    "MagnaTagATune": "mtt",
    "FSD50K": "fsd50k",
    "ESC-50": "esc50",
    "UrbanSound8K": "us8k",
}


def test_published_card_reports_table_ii_with_attribution():
    card = ModelCard.load(CARDS / "matpac-vit-base.md")
    assert card.data.library_name == "transformers"
    results = card.data.eval_results
    assert {CARD_DATASETS[r.dataset_name]: r.metric_value for r in results} == {
        name: TASKS[name].paper_score for name in CARD_DATASETS.values()
    }
    assert all(
        r.metric_type == ("mAP" if TASKS[CARD_DATASETS[r.dataset_name]].multi_label else "accuracy") for r in results
    )
    assert all("Table II" in r.source_name for r in results)
    for section in (
        "## Intended uses and limitations",
        "## How to convert and load",
        "## Training data and recipe",
        "## Evaluation",
        "## Citation",
        "python -m modeling_matpac.convert",
    ):
        assert section in card.text


def test_template_placeholders_are_documented_and_fill_into_a_valid_card():
    template = (CARDS / "TEMPLATE.md").read_text()
    placeholders = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    documented = set(re.findall(r"`(\w+)`", (CARDS / "README.md").read_text().split("| placeholder |")[1]))
    assert placeholders == documented
    filled = template.format(**{name: f"<{name}>" for name in placeholders} | {"license": "apache-2.0"})
    card = ModelCard(filled)
    assert card.data.license == "apache-2.0" and "matpac" in card.data.tags
    assert "@inproceedings{quelennec2025matpac," in card.text and "{{" not in card.text
    assert "<num_train_steps> optimizer steps" in card.text
