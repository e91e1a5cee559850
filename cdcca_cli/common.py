"""Small helpers shared by the CLI commands: one-line errors and settings with flag overrides."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console

console = Console()
err_console = Console(stderr=True)

# Errors that are the user's input or environment, reported as one line (no traceback).
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


@contextmanager
def one_line_errors():
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except _USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        sys.exit(1)
