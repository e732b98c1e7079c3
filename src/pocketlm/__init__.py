"""pocketlm: distill a large language model into a small one, and prove what was kept and what was lost."""
from __future__ import annotations

from pocketlm.core.version import __version__  # noqa: F401 - the public version


def _register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the pocketlm student (model_type "pocketlm")."""
    try:
        from pocketlm.models.student import register_auto_classes
    except ModuleNotFoundError as e:  # only while the package is being assembled
        if e.name != "pocketlm.models.student":
            raise
        return
    register_auto_classes()


_register_auto_classes()
