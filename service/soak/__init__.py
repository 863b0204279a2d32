"""The chaos soak (docs/operations.md, "Chaos soak"): service/soak/run.py."""
