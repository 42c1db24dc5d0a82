"""orchd's exceptions: one root, so the CLI can print any of them as a one-line error."""


class OrchdError(Exception):
    """Root of every error orchd raises on purpose."""


class SpecError(OrchdError):
    """A job spec is malformed: the message names the file, the key path and the line."""


class ConfigError(OrchdError):
    """The configuration (environment or config file) is unusable."""


class BackendError(OrchdError):
    """A backend could not do what was asked (submit, poll, read, cancel)."""


class JobNotFound(OrchdError):
    """No job has the given id."""


class TickBusy(OrchdError):
    """Another tick holds the tick lock; this one did nothing."""


class BudgetError(OrchdError):
    """A job's projected cost does not fit in what remains of a budget."""
