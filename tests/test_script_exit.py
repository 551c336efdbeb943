import io

from tqdm import tqdm

from modeling_matpac.script_exit import close_progress_bars


def test_the_line_a_script_ends_with_is_a_line_of_its_own():
    """Before: Ctrl-C while a checkpoint was written printed the message on the end of "Writing model shards: 0%"."""
    stream = io.StringIO()
    bar = tqdm(total=4, file=stream, desc="Writing model shards")
    bar.update(1)
    close_progress_bars()
    stream.write("run_pretraining.py: interrupted.\n")
    lines = stream.getvalue().split("\n")
    assert lines[-2] == "run_pretraining.py: interrupted."
    assert "Writing model shards:  25%" in lines[-3]
    assert bar.disable is True and bar not in tqdm._instances  # closed
