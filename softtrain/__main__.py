"""``python -m softtrain`` and the ``softtrain`` command (``softprep.run_console``)."""

from softprep import run_console


def main() -> None:
    run_console("softtrain")


if __name__ == "__main__":
    main()
