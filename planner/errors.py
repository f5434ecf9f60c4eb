"""Input errors that name where the problem is; the CLI maps them to exit 2."""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a trace line, a cluster spec, a CLI value."""


class TraceError(InputError):
    def __init__(self, source: str, line: int, field: str | None, value: object, reason: str) -> None:
        self.source, self.line, self.field, self.value, self.reason = source, line, field, value, reason
        where = f"{source}:{line}"
        what = f" field {field!r} = {value!r}" if field is not None else ""
        super().__init__(f"{where}:{what} {reason}")


class ClusterSpecError(InputError):
    pass


class PlacementError(InputError):
    """A placement that cannot hold its weights, or a request no placement can serve."""
