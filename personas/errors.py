"""User-facing errors: one line naming the problem and the fix; the CLIs exit with code 2."""

from __future__ import annotations


class GroupshotError(ValueError):
    """A problem with the user's input or environment that the user can fix."""


class ModelUnavailableError(GroupshotError):
    """Weights that were asked for cannot be had (offline, missing folder, ...)."""
