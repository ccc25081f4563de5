"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class VpdError(Exception):
    """A problem with the user's input, flags or files (not a bug in vpd)."""


class ConfigMismatch(VpdError):
    """Resuming an output under a different config than the one that wrote it."""


class ToolsUnavailable(VpdError):
    """The tool backend cannot work at all (e.g. a model that does not load).

    Not a program's fault: the execute stage stops instead of recording every program
    as failed, so a rerun after the fix executes them (nothing is marked done).
    """
