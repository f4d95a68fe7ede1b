"""The one base class for errors the user can fix: a bad option, config value, data file or request.

The rule: the library raises `UserError` (a `ValueError`, so `except ValueError` keeps working) where it rejects
input a person chose on purpose - a command-line option, a config key or value, a data file, a domain name, a
server setting. The CLI turns it into one red line and exit code 1. A plain `ValueError`, `TypeError`,
`RuntimeError`, ... means a broken internal contract (e.g. "3 prompts but 2 responses" between two of our own
functions): from the CLI that is a bug of ours, reported with its traceback saved and exit code 2.

This module imports nothing, so any layer can use it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input the user gave (option, config, data, request) that the library rejects; the message says what to fix."""


class UnsupportedError(UserError, NotImplementedError):
    """An operation this system (or setting) does not offer, e.g. add-domain on a system without a router."""
