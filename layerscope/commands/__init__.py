"""Subcommands of the ``layerscope`` CLI, one module each (see layerscope/cli.py)."""
