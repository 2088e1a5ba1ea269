"""User-facing errors: the CLI prints these as one line, without a traceback (unless --debug)."""


class IlaError(Exception):
    """An error caused by the user's input or environment; the message is one line naming what is wrong."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
