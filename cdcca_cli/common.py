"""Small helpers shared by the CLI commands: one-line errors, and the one source of every flag
default that is also a setting or a round option (so `sync`, `tui` and `demo` cannot disagree)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperOption

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


# typer's rich help prints "<bool>" after every on/off flag, as if it took a value: hide it.
if hasattr(TyperOption, "display_type_rich"):
    _display_type = TyperOption.display_type_rich

    def _no_bool_metavar(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag and self.metavar is None else _display_type(self, ctx)

    TyperOption.display_type_rich = _no_bool_metavar  # type: ignore[method-assign]


def round_option(name: str, *decls: str, help: str | None = None) -> Any:
    """A flag for a ``RoundOptions`` field: its default and description come from the wire
    schema, the one definition the server validates against too."""
    from device.contracts.wire import RoundOptions

    f = RoundOptions.model_fields[name]
    return typer.Option(f.default, *decls, help=help or f.description, show_default=True)


def cloud_url_option() -> Any:
    return typer.Option(None, "--cloud", help=f"cloud base URL (default: {setting_default('cloud_url')}, "
                                              "or CDCCA_CLOUD_URL / config.toml)")


def token_option() -> Any:
    return typer.Option(None, "--token", envvar="CDCCA_DEVICE_TOKEN",
                        help="this device's bearer token, from `cdcca cloud add-device NAME` on the cloud; "
                             "a flag shows in `ps`: prefer CDCCA_DEVICE_TOKEN or the 0600 file <home>/device/token")


def load_device_settings(**overrides: Any) -> Any:
    """Settings with the device token resolved: --token / CDCCA_DEVICE_TOKEN first, else the
    token file ``<home>/device/token`` (refused if others can read it)."""
    from device.contracts.config import load_settings
    from device.trust import read_token

    s = load_settings(**overrides)
    s.device_token = read_token(s.device_dir, s.device_token)
    return s


def setting_default(name: str) -> Any:
    from device.contracts.config import Settings

    return Settings.model_fields[name].default


def quant_option() -> Any:
    return typer.Option(None, "--quant", help="embedded model type: f32 | f16 | q8_0 | q4_0 (default: "
                                              f"{setting_default('device_quant')}, or CDCCA_DEVICE_QUANT)")


def threads_option() -> Any:
    return typer.Option(None, "--threads",
                        help=f"llama.cpp threads (default: {setting_default('threads')}, or CDCCA_THREADS)")


def max_tokens_option() -> Any:
    return typer.Option(None, "--max-tokens",
                        help="longest answer in tokens; a longer one is cut and marked '…' (default: "
                             f"{setting_default('max_tokens')}, or CDCCA_MAX_TOKENS)")
