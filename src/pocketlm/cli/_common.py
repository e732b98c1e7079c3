"""What every command module shares: the apps, and how an expected error is shown (one line, no traceback)."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="pocketlm",
    help="Distill a large language model into a small one, and prove what was kept and what was lost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# errors a user can cause and fix: printed as one clear message, no traceback
_EXPECTED = (ValueError, FileNotFoundError, FileExistsError, RuntimeError, KeyError)


def _fail(e: BaseException) -> None:
    typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


eval_app = typer.Typer(help="Evaluate any causal LM (teacher, student, exported folder, GGUF) the same way.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

audit_app = typer.Typer(help="Audit any causal LM for toxicity and social bias, optionally against a baseline model.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")
