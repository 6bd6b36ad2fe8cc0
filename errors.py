"""UsageError: bad input found before any heavy work.

Every stage may raise it (the loaders, the argument checks, the streamed pipeline), so it sits below them
all; acur.py reports it as one line with exit code 2. datautils re-exports it for existing callers.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input found before any heavy work: acur.py reports it as one line, exit code 2."""
