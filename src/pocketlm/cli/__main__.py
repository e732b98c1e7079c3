"""`python -m pocketlm.cli ...` runs the CLI (the trainer tests launch it this way)."""
from pocketlm.cli import app

app()
