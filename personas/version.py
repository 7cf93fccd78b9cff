"""The toolkit version stamped into every file groupshot writes."""

from __future__ import annotations

from importlib import metadata

try:
    TOOLKIT_VERSION = metadata.version("groupshot")
except metadata.PackageNotFoundError:  # running from a source tree without install
    TOOLKIT_VERSION = "0.1.0+src"
