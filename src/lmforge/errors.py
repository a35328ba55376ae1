"""User-facing errors: the CLI prints their message and exits non-zero, never a traceback."""


class LmforgeError(Exception):
    """An error the user can fix (bad path, bad config, bad input). Exit code 2."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A recipe or CLI override that does not validate; the message names the key."""


class InputError(LmforgeError):
    """Input data that cannot be used at all (missing file, no readable records)."""
