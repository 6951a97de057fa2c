"""Exception and warning types. Every message says what was wrong, where, and what would be right."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlmkitError(Exception):
    """Base class of every error llmkit raises on purpose (bad input, impossible request)."""


class UnknownNameError(LlmkitError):
    """A block kind, backend, impl or plugin name that is not registered."""

    def __init__(
        self, what: str, name: str, valid: Iterable[str], note: str = "", where: str = ""
    ) -> None:
        valid = sorted(set(valid))
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        msg = f"unknown {what} {name!r}" + (f" ({where})" if where else "")
        msg += f"; valid: {', '.join(valid)}" if valid else f"; no {what} is registered"
        if close:
            msg += f"; did you mean {close[0]!r}?"
        if note:
            msg += f"\n{note}"
        super().__init__(msg)
        self.name = name
        self.valid = valid
        self.closest = close[0] if close else None


class BackendUnavailableError(LlmkitError):
    """The requested backend exists but cannot run here (missing device, broken plugin...)."""


class ResolutionError(LlmkitError):
    """No implementation can run a block for the requested target and policy."""


class PluginContractError(LlmkitError):
    """A plugin returned something that breaks the plugin contract (raised while loading)."""


class LlmkitWarning(UserWarning):
    """Base class of llmkit's warnings."""


class FallbackWarning(LlmkitWarning):
    """A block runs on an impl outside the requested backend (normally the reference)."""


class PluginWarning(LlmkitWarning):
    """A plugin failed to load or had part of its contribution skipped."""


class CertificateWarning(LlmkitWarning):
    """Certificate files that could not be used (unreadable, malformed, tampered with) were ignored."""
