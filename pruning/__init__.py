"""Neural-network pruning research under noise.

The core (layout, gradients, methods, noise, models, data, train) is importable without Hydra:
plain arguments and small dataclasses. Hydra lives at the edge (`launch.py`, `pruning.task`).
"""

__version__ = "0.1.0"

__all__ = ["PrunedModel", "load_pruned"]


def __getattr__(name: str):  # lazy: `import pruning` stays light (no torch) until a loader is used
    if name in ("load_pruned", "PrunedModel"):
        from pruning import artifacts

        return getattr(artifacts, name)
    raise AttributeError(f"module 'pruning' has no attribute {name!r}")
