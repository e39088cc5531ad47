"""Importable from the trainer tests' config by dotted path (pytest puts this folder on sys.path)."""


def even_length(response: str, answer) -> float:
    """A verifier that gives a random-looking policy a mix of rewards: 1 for even-length replies."""
    return float(len(response) % 2 == 0)
