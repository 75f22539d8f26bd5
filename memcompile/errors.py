"""The errors memcompile raises on purpose, each saying what was wrong and what is valid."""

from __future__ import annotations

import math


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
    """A memory budget below the least peak memcompile can reach for this graph.

    The message says what was asked, the least reachable peak, and what to pass instead: for a
    fraction (`budget` a float, `reference_bytes` the save-everything peak it is a fraction of),
    the least reachable fraction, rounded up so that passing it is met; for bytes, the least
    peak in MiB, rounded up likewise.
    """

    def __init__(self, budget_bytes: int, least_peak_bytes: int, detail: str = "", *,
                 budget: float | None = None, reference_bytes: int | None = None):
        self.budget_bytes = budget_bytes
        self.least_peak_bytes = least_peak_bytes
        self.budget = budget
        self.reference_bytes = reference_bytes
        self.least_fraction = (_least_fraction(least_peak_bytes, reference_bytes)
                               if isinstance(budget, float) and reference_bytes else None)
        """The smallest two-decimal fraction whose budget the least peak meets (None for a byte
        budget, or when no fraction up to 1.0 does)."""
        extra = f" ({detail})" if detail else ""
        if isinstance(budget, float) and reference_bytes:
            least = least_peak_bytes / reference_bytes
            use = (f"use {self.least_fraction} or 'auto'" if self.least_fraction is not None
                   else "no fraction up to 1.0 reaches it; use 'auto' or None")
            message = (f"memory_budget={budget} cannot be met: the least reachable is "
                       f"{least:.4f} of the save-everything peak ({least_peak_bytes:,} of "
                       f"{reference_bytes:,} bytes; {budget} is {budget_bytes:,}){extra}; {use}")
        else:
            mib = math.ceil(least_peak_bytes / 2**20 * 100) / 100
            message = (f"memory_budget of {budget_bytes:,} bytes cannot be met: the least "
                       f"achievable peak is {least_peak_bytes:,} bytes{extra}; use "
                       f"'{mib:.2f}MiB' or more, or 'auto'")
        super().__init__(message)


def _least_fraction(least_peak: int, reference: int) -> float | None:
    """The least two-decimal fraction f with int(f * reference) >= least_peak (a fraction
    budget resolves to that many bytes), or None above 1.0."""
    cents = math.ceil(least_peak / reference * 100)
    while cents <= 100 and int(cents / 100 * reference) < least_peak:
        cents += 1
    return cents / 100 if cents <= 100 else None


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
