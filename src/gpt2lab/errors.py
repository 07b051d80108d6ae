"""The one exception type a user can cause.

Everything a user can get wrong (a bad path, a corrupt checkpoint, a tensor of the
wrong shape, a prompt longer than the context, an invalid argument) raises
`GPT2LabError` with a message that says what was wrong and what to do, so the CLI
and the HTTP server can turn it into one line or a 4xx instead of a traceback.
"""


class GPT2LabError(Exception):
    """A problem with the caller's input, not a bug in gpt2lab."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line, never empty (torch.load's EOFError has no message: the
    type's name then), cut to `limit` characters: for wrapping a library's error into
    one of ours without its multi-line detail."""
    try:
        text = str(e).strip()
    except Exception:  # a broken __str__ must not break the error report
        text = ""
    line = text.splitlines()[0].strip() if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(text: object, limit: int | None = None) -> str:
    """A message (or an exception's whole message) folded onto one line: a user reading
    stderr, or a script parsing it, gets exactly one line per failure."""
    folded = " ".join(str(text).split())
    if isinstance(text, BaseException) and not folded:
        folded = type(text).__name__
    return folded if limit is None or len(folded) <= limit else folded[: limit - 3] + "..."
