"""Exceptions shared across layers."""


class InputError(ValueError):
    """Something the user supplied (files, flags, config) is unusable.

    The message is one sentence meant for the user; the CLI prints it without a traceback.
    """


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps; the message names the
    step and the loss term. The CLI prints it without a traceback."""
