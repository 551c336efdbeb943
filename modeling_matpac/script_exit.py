"""What a command-line script releases when it ends on an error or an interruption, before the one line it prints."""

import multiprocessing
import signal

from tqdm import tqdm


def close_progress_bars() -> None:
    """
    Closes the progress bars still drawn (a checkpoint's "Writing model shards", the training bar), so that the one
    line a script ends with is a line of its own: an error or Ctrl-C in a bar's middle left the cursor at its end,
    and the message was printed on the bar's line.
    """
    for bar in list(tqdm._instances):
        bar.close()


def stop_worker_processes() -> None:
    """
    Kills the script's worker processes (DataLoader workers, a cache build's pool) and waits for them. Python's exit
    ends daemonic children with SIGTERM and waits for them, and the pre-training loader's workers ignore SIGTERM (a
    cluster's must not end them before the run has saved): after an error raised by the loader, the process printed
    its line and then waited forever. SIGCHLD gets its default handling back first: the DataLoader's handler would
    report the kill as a failed worker.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join()
