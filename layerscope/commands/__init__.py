"""Subcommands of the ``layerscope`` CLI, one module each (see layerscope/cli.py).

Their one-line help is here, in the order ``layerscope --help`` lists them: the CLI lists
every command without importing any, and imports only the module of the command it runs.
"""

HELP = {
    "trace": "run a model on texts or images and write what happens inside it to a Zarr store",
    "estimate": "say how many bytes a trace of N samples will take, and whether the disk has "
                "room for it",
    "info": "list the variables, dims, sizes and status of a trace, and what was not captured",
    "verify": "read every chunk of a trace and report each damaged or missing one (exit 1 "
              "when any is)",
    "render": "draw a view of a trace (PNG, SVG or PDF by the suffix of -o)",
    "report": "write a self-contained HTML report of a trace (opens without a server)",
    "diff": "compare two traces (e.g. one model in two frameworks) and name the first divergence",
}
