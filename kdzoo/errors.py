"""Errors that mean "the user's input is wrong": the CLI turns them into one paragraph and exit code 2."""


class UserInputError(ValueError):
    """Bad config, unknown name, missing or mismatched file, corrupt data: nothing was started."""


class CheckpointError(UserInputError):
    """A checkpoint file is missing, unreadable, corrupt or does not fit the model."""
