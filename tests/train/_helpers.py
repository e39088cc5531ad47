"""Importable from the trainer tests' config by dotted path (pytest puts this folder on sys.path)."""


def parity(response: str, answer) -> float:
    """A verifier that gives a random policy a mix of rewards: 1 when the reply's code points sum to an even number."""
    return float(sum(map(ord, response)) % 2 == 0)
