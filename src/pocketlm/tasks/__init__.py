"""The pipeline's measurements, one module each (the Task contract: `pocketlm.tasks.base`)."""
