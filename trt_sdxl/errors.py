"""The one exception type for mistakes a user can make (bad file, flag or input), and how the
command-line entry points turn it into one line on stderr and exit code 2, without a traceback.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message names the file, tensor or flag and what was expected."""


def run_cli(prog: str, work: Callable[[], None], interrupted: str) -> int:
    """Run an entry point's work: UserError -> `prog: error: message`, exit 2; Ctrl-C -> exit 130."""
    try:
        work()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    return 0
