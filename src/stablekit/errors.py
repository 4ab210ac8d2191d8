"""The one exception type stablekit raises for bad input: its message is the line the CLI prints."""


class StablekitError(ValueError):
    """Bad input or an impossible request, with a one-line message saying how to fix it."""


def require_counts(obj, names) -> None:
    """Refuse (one line) the first of `obj`'s attributes `names` that is below 1: counts in a frozen config."""
    for name in names:
        if getattr(obj, name) < 1:
            raise StablekitError(f"{name} must be at least 1, got {getattr(obj, name)}")
