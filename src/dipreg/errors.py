"""Exceptions raised by dipreg for problems the user can fix."""


class DipregError(Exception):
    """A bad input or a failed registration, described in one line for the user."""
