"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class DpftError(Exception):
    """Bad input (config, override, data, run directory). Message is one line, no traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
