"""The progress bars of a script that ends on an error or an interruption."""

from tqdm import tqdm


def close_progress_bars() -> None:
    """
    Closes the progress bars still drawn (a checkpoint's "Writing model shards", the training bar), so that the one
    line a script ends with is a line of its own: an error or Ctrl-C in a bar's middle left the cursor at its end,
    and the message was printed on the bar's line.
    """
    for bar in list(tqdm._instances):
        bar.close()
