"""The one exception type stablekit raises for bad input: its message is the line the CLI prints."""


class StablekitError(ValueError):
    """Bad input or an impossible request, with a one-line message saying how to fix it."""
