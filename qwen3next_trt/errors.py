"""Errors a user can act on.

Anything the user handed us that is wrong (a config field, a checkpoint file, a tensor) raises
`InputError`; the CLI prints its one-line message and exits with code 2. Bugs stay ordinary
exceptions so they keep their traceback.
"""


class InputError(Exception):
    """Bad user input: the message names the file and the field or tensor, and what was expected."""

    exit_code = 2


class ToleranceError(Exception):
    """A parity check ran and the measured error exceeded its tolerance (CLI exit code 1)."""

    exit_code = 1


class NumericalError(Exception):
    """A run on well-formed input produced numbers that are not numbers (NaN/Inf logits): the export
    or its weights are at fault, not the request, so this is a failed result (CLI exit code 1, like a
    tolerance failure) and not bad input (exit code 2; a server answers it as its own error, not 400)."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt so that every `except Exception` lets it through
    and every cleanup (`except BaseException` / `finally`) runs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
