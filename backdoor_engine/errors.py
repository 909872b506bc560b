"""Errors raised for bad user input (datasets, checkpoints, options)."""


class InputError(ValueError):
    """Bad input from the user: names the field or file and what was expected."""
