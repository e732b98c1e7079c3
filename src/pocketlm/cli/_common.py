"""What every command module shares: the apps, and how an expected error is shown (one line, no traceback)."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

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


def _fail(e: BaseException) -> None:
    typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


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
app.add_typer(eval_app, name="eval")

audit_app = typer.Typer(help="Audit any causal LM for toxicity and social bias, optionally against a baseline model.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")
