"""Neural-network pruning research under noise.

The core (layout, gradients, methods, noise, models, data, train) is importable without Hydra:
plain arguments and small dataclasses. Hydra lives at the edge (`launch.py`, `pruning.task`).
"""

__version__ = "0.1.0"
