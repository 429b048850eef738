"""The installed package's version, in a module of its own so that no module needs to import the
package root (`safe_cache/__init__.py`) for it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("safe-cache")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
