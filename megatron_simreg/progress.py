"""Progress bars on a terminal only.

A bar redraws itself with carriage returns and leaves its line unterminated: in a log file (Slurm's, a pipe)
that is one endless line, and whatever is printed next (the stop message) lands at its end. Off a terminal the
bar is off, and its `write` lines (the periodic log lines) are all the output.
"""

import sys

from tqdm import tqdm


def progress_bar(enabled: bool = True, **kwargs) -> tqdm:
    return tqdm(disable=not (enabled and sys.stderr.isatty()), **kwargs)
