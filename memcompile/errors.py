"""The errors memcompile raises on purpose, each saying what was wrong and what is valid."""

from __future__ import annotations


class MemcompileError(Exception):
    """Base class of every error memcompile raises on purpose."""


class OptionsError(MemcompileError, ValueError):
    """An option key or value that memcompile does not accept.

    The message names the key, the value given, and what is valid, so it reads on its own at the
    top of what the user sees (Dynamo wraps backend errors in `BackendCompilerFailed`).
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"memcompile option {key!r}: {message}")


class MemoryBudgetError(MemcompileError):
    """A memory budget below the least peak memcompile can reach for this graph."""

    def __init__(self, budget_bytes: int, least_peak_bytes: int, detail: str = ""):
        self.budget_bytes = budget_bytes
        self.least_peak_bytes = least_peak_bytes
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"memory_budget of {budget_bytes:,} bytes cannot be met: the least achievable peak "
            f"is {least_peak_bytes:,} bytes{extra}"
        )


class PassError(MemcompileError):
    """A pass raised; the message names it and the passes that ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], dump_path: str | None,
                 cause: BaseException):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        before = ", ".join(ran_before) if ran_before else "none"
        where = f"; the graph it failed on is in {dump_path}" if dump_path else ""
        super().__init__(f"pass {pass_name!r} failed with {type(cause).__name__}: {cause} "
                         f"(passes run before it: {before}){where}")


class UnknownPassError(MemcompileError, ValueError):
    """A pass name the registry does not know; the message lists the valid ones."""


class NotAvailableError(MemcompileError, NotImplementedError):
    """An option whose feature is planned but not built yet."""


class MemcompileWarning(UserWarning):
    """A feature the user asked for did not apply to a graph; the message names the graph and
    says why. Filter it like any warning: `warnings.filterwarnings("ignore",
    category=memcompile.MemcompileWarning)`. What an "auto" option chose not to do is a note in
    the report, never this warning."""
