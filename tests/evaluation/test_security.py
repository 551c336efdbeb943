"""Issue 11, item 8: user files are read without running code from them."""

from pathlib import Path

import numpy as np
import pytest

from modeling_matpac.evaluation.tasks import ProbeDataError, load_task


class WritesMarker:
    """Unpickling it writes a file: stands for arbitrary code in a crafted dataset file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_crafted_openmic_npz_cannot_run_code(tmp_path):
    """Before: `np.load(..., allow_pickle=True)` unpickled `sample_key` and ran the code (the marker was written)."""
    from test_tasks import make_task

    root = make_task("openmic", tmp_path / "openmic-2018")
    marker = tmp_path / "marker.txt"
    with np.load(root / "openmic-2018.npz", allow_pickle=True) as npz:
        arrays = dict(npz)
    keys = np.empty(len(arrays["sample_key"]), dtype=object)
    keys[:] = list(arrays["sample_key"])
    keys[0] = WritesMarker(marker)
    np.savez(root / "openmic-2018.npz", **{**arrays, "sample_key": keys})
    with pytest.raises(ProbeDataError, match="sample_key of .*openmic-2018.npz is not an array of strings"):
        load_task("openmic", root)
    assert not marker.exists()
    # The keys as a plain string array need no pickle at all.
    np.savez(root / "openmic-2018.npz", **{**arrays, "sample_key": arrays["sample_key"].astype(str)})
    assert len(load_task("openmic", root).ids) == 24


def test_no_loader_of_user_files_unpickles():
    """Every `np.load` refuses pickles, every `torch.load` loads weights only, nothing calls `pickle.load`."""
    package = Path(__file__).parents[2]
    sources = [*package.glob("modeling_matpac/**/*.py"), *package.glob("*.py"), *package.glob("benchmarks/*.py")]
    for path in sources:
        text = path.read_text()
        assert "allow_pickle=True" not in text, path
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line and not line.lstrip().startswith(("#", "`")):
                assert "weights_only=True" in line, (path, line)
