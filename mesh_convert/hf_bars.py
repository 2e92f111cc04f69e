"""transformers draws its own tqdm bars ("Loading weights", "Writing model shards") on stderr,
between the command line's tables and its own progress display; the commands hide them around
the calls that draw them, all in the same way."""

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transformers_bars_hidden() -> Iterator[None]:
    """Hide transformers' progress bars inside the block, and restore them after it (when the
    user turned them off, they stay off)."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
