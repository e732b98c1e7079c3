"""Vision-language students: data and image handling, two-stage training (LLaVA), evaluation and inspection."""
