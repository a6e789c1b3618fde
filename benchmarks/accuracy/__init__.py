"""lm-eval accuracy of fleetlm's weight and KV-cache variants against transformers (run.py)."""
