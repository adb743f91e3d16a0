"""User-facing errors: one line that names the problem and the fix."""


class EdgeprefillError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero."""
