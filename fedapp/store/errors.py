"""The run store's errors: one line each, naming the store (password masked)."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The run store could not do what was asked; one line that names the store (password masked)."""


class UnknownRunError(StoreError):
    """No run with that id in this store."""
