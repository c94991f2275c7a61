"""The one exception class for mistakes a user can fix (bad data, config, paths, devices,
checkpoints, tracking server). Drivers print it as one line, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""
