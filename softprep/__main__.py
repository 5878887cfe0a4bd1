"""``python -m softprep`` and the ``softprep`` command (``softprep.run_console``)."""

from softprep import run_console


def main() -> None:
    run_console("softprep")


if __name__ == "__main__":
    main()
