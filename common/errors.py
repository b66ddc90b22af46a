"""The base of every error the pipeline raises on purpose: its message names the row, file or option,
so a stage prints it alone (no traceback) and exits 1."""


class PipelineError(Exception):
    pass
