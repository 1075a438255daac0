"""One exception type for everything a user can get wrong.

The CLI turns a `RadialError` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback. Messages name the file, tensor or argument at fault and say what was expected.
"""


class RadialError(Exception):
    """Bad input: a checkpoint, file, argument or option that cannot be used as given."""


class CheckpointError(RadialError):
    """A checkpoint folder or weight file is missing, truncated, corrupt or does not match its config."""


class SettingError(RadialError, ValueError):
    """An argument outside its meaningful range; also a ValueError, for API callers who catch that."""
