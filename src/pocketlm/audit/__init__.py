"""Audits of any causal LM, alone or against a baseline: social bias suites scored by log-likelihood (`bias`),
toxicity of prompted generations (`toxicity`, `prompted`)."""
