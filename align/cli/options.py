"""Reading command-line options the same way in every command."""

from __future__ import annotations


def text_or_file_option(value: str | None, option: str, what: str) -> str | None:
    """``--option TEXT`` or ``--option @FILE`` (see :func:`align.config.text_or_file`), with errors naming the
    option as the user typed it."""
    from align.config import text_or_file
    from align.errors import ConfigError

    try:
        return text_or_file(value, what)
    except ValueError as exc:
        raise ConfigError(f"{option} {value}: {exc}") from None
