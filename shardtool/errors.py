"""The errors a user can see: each carries a one-line message that says what is wrong and how to fix it."""


class ShardtoolError(Exception):
    """Base class: the CLI prints str(error) on one line and exits non-zero."""


class ConfigError(ShardtoolError):
    """Bad options or a bad SOURCE/OUT: raised before any work starts."""


class PackError(ShardtoolError):
    """The pack could not finish (a worker died, too many skips, ...)."""
