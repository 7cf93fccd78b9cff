"""groupshot stage 1: train one identity adapter (a persona) per person.

Importing this package loads no model and touches no network or GPU.
"""

from personas.version import TOOLKIT_VERSION
from personas.errors import GroupshotError, ModelUnavailableError

__all__ = ["TOOLKIT_VERSION", "GroupshotError", "ModelUnavailableError"]
