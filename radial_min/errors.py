"""One exception type for everything a user can get wrong.

The CLI turns a `RadialError` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback. Messages name the file, tensor or argument at fault and say what was expected.
"""


def count(n: int, noun: str, plural: str | None = None) -> str:
    """A number and its noun, for messages: '1 sequence', '3 sequences', '12,288 tokens', '1 patch', '4 patches'."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


class RadialError(Exception):
    """Bad input: a checkpoint, file, argument or option that cannot be used as given."""


class CheckpointError(RadialError):
    """A checkpoint folder or weight file is missing, truncated, corrupt or does not match its config."""


class SettingError(RadialError, ValueError):
    """An argument outside its meaningful range; also a ValueError, for API callers who catch that."""
