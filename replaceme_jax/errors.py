"""One exception type for bad input: the message names the problem and the fix."""


class ReplaceMeError(Exception):
    """Raised for user-facing problems (bad paths, configs, data, cuts, solver names)."""
