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
