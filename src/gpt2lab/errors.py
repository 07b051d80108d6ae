"""The one exception type a user can cause.

Everything a user can get wrong (a bad path, a corrupt checkpoint, a tensor of the
wrong shape, a prompt longer than the context, an invalid argument) raises
`GPT2LabError` with a message that says what was wrong and what to do, so the CLI
and the HTTP server can turn it into one line or a 4xx instead of a traceback.
"""


class GPT2LabError(Exception):
    """A problem with the caller's input, not a bug in gpt2lab."""
