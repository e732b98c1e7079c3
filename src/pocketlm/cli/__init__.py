"""The `pocketlm` command line: thin — it parses, calls the one API function a Python user would call, and prints.

One module per user noun, each holding its commands as plain functions: `distill`, `run` (the pipeline and the
demo), `export`, `inspect` (size, attention, prune, prune-heads), `eval` (perplexity, rouge), `audit` (bias,
scorer-check, toxicity, probes), `vlm` (train, eval, caption). This file assembles them into the app, in the order
``pocketlm --help`` lists them; `_common` holds the apps, the error display and the shared options.
"""
from __future__ import annotations

import os

import typer

from pocketlm import __version__
from pocketlm.cli import audit, distill, export, inspect, run, vlm
from pocketlm.cli import eval as evaluate
from pocketlm.cli._common import app, audit_app, eval_app, vlm_app
from pocketlm.core import distributed


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pocketlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow models and tokenizers whose "
                                           "repository ships its own Python code to run it (off by default)."),
) -> None:
    """pocketlm: distill → evaluate → audit → inspect → report."""
    # --trust-remote-code is read by each command from this context (`_common.remote_code`) and passed on
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch: join the group
        distributed.init()


app.command()(distill.distill)
app.command()(run.demo)
app.command()(export.export)
app.command()(inspect.size)
app.command("run")(run.run_cmd)
app.command("attention")(inspect.attention)
app.command("prune-heads")(inspect.prune_heads)
app.command("prune")(inspect.prune)

app.add_typer(eval_app, name="eval")
eval_app.command("perplexity")(evaluate.eval_perplexity)
eval_app.command("rouge")(evaluate.eval_rouge)

app.add_typer(audit_app, name="audit")
audit_app.command("bias")(audit.audit_bias_cmd)
audit_app.command("scorer-check")(audit.scorer_check_cmd)
audit_app.command("toxicity")(audit.toxicity_cmd)
audit_app.command("probes")(audit.probes_cmd)

app.add_typer(vlm_app, name="vlm")
vlm_app.command("train")(vlm.vlm_train)
vlm_app.command("eval")(vlm.vlm_eval)
vlm_app.command("caption")(vlm.vlm_caption)
