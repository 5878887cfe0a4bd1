"""``python -m softprep`` and the ``softprep`` command. A Ctrl-C while the CLI is still being
imported (its first ~0.3 s) or parsing arguments is one line and exit 130, like one during
the command."""

import os
import sys


def main() -> None:
    try:
        from softprep.cli import main as run
    except KeyboardInterrupt:
        print("interrupted before the command started", file=sys.stderr, flush=True)
        os._exit(130)  # not SystemExit: CPython 3.11 may still exit by SIGINT if the
        # interrupt came through exec()'d code (dataclasses), with no message
    try:
        run()
    except KeyboardInterrupt:  # outside a command's own handling (argument parsing, ...)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
