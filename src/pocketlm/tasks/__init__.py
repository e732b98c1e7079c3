"""The pipeline's measurements, one module each; the Task contract is `pocketlm.tasks.base`.

Importing the package registers every task (:data:`TASKS`, by its stable name) and the views of the Results kinds
they write (:data:`VIEWS`, read by the report and the card). `pocketlm.pipeline` orders them.
"""
from pocketlm.tasks import (attention, bias, distill, export, perplexity, probes, prune_heads, rouge, scorer_check, size,
                            toxicity)
from pocketlm.tasks.base import TASKS, VIEWS, Context, Entry, StageOutput, StageUnavailable, Task, View, register, view

__all__ = ["TASKS", "VIEWS", "Context", "Entry", "StageOutput", "StageUnavailable", "Task", "View", "attention",
           "bias", "distill", "export", "perplexity", "probes", "prune_heads", "register", "rouge", "scorer_check", "size",
           "toxicity", "view"]
