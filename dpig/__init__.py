"""dpig's public Python API: `from dpig.client import Client` (docs/api.md, "Python client")."""
