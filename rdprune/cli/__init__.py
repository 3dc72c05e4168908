"""Command-line entry points (``python -m rdprune.run``, ``python -m rdprune.compare``) and the error
contract they share (:mod:`.common`)."""
