"""User-facing errors: the CLI prints these as one line, without a traceback (unless --debug)."""


class IlaError(Exception):
    """An error caused by the user's input or environment; the message is one line naming what is wrong."""
