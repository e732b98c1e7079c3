"""What every command module shares: the apps, how an expected error is shown (one line, no traceback), the
``--out`` folder guard, the root ``--trust-remote-code`` flag, and the options several commands take."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, NoReturn

import typer

from pocketlm.core.outdir import OVERWRITE_HELP, output_folder

app = typer.Typer(
    name="pocketlm",
    help="Distill a large language model into a small one, and prove what was kept and what was lost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# errors a user can cause and fix: printed as one clear message, no traceback (an OSError names its file: a full
# disk, a folder that cannot be written)
_EXPECTED = (ValueError, OSError, RuntimeError, KeyError)

OVERWRITE = typer.Option(False, "--overwrite", help=OVERWRITE_HELP)
QUIET = typer.Option(False, "--quiet", help="No progress bars.")


def _fail(e: BaseException) -> NoReturn:
    typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def one_of(names: Iterable[str]) -> str:
    """'a, b, c or d': a registry's names for a help text (a new entry shows up without a CLI edit)."""
    *rest, last = list(names)
    return f"{', '.join(rest)} or {last}" if rest else last


def remote_code(ctx: typer.Context) -> bool | None:
    """The root ``--trust-remote-code`` flag of this invocation, passed on to the loaders as an argument: True
    when given, else None (the loader's default: off unless ``POCKETLM_TRUST_REMOTE_CODE=1``)."""
    return True if ctx.find_root().params.get("trust_remote_code") else None


def remote_code_overrides(ctx: typer.Context) -> list[str]:
    """For a config-driven command (distill, run): the flag as the config's own ``trust_remote_code`` field."""
    return ["trust_remote_code=true"] if remote_code(ctx) else []


@contextmanager
def held_folder(out: Path, *, kind: str, overwrite: bool) -> Iterator[Path]:
    """`pocketlm.core.outdir.output_folder` for a command's ``--out`` folder, its refusal shown as a CLI error."""
    with ExitStack() as stack:
        try:
            stack.enter_context(output_folder(out, kind=kind, overwrite=overwrite))
        except _EXPECTED as e:
            _fail(e)
        yield out


eval_app = typer.Typer(help="Evaluate any causal LM (teacher, student, exported folder, GGUF) the same way.",
                       no_args_is_help=True)
audit_app = typer.Typer(help="Audit any causal LM for toxicity and social bias, optionally against a baseline model.",
                        no_args_is_help=True)
vlm_app = typer.Typer(help="Vision-language students: train (LLaVA's two stages), evaluate, caption.",
                      no_args_is_help=True)
