"""The one error type labelcomp raises for bad input; the CLI prints it as one line and exits 2."""


class LabelcompError(Exception):
    """Bad input: the message names the file, row or key, what was expected and what to do."""
