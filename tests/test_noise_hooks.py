"""Noise models declare what they act on (`ACTS_ON`), and the declaration is what the calibration
step applies: it must list exactly the hooks each model implements."""

from __future__ import annotations

import pytest
import torch

from pruning import noise as noise_mod
from pruning.calibrate import acts_on, apply_row_noise, noise_cache_key
from pruning.noise import HOOKS, NoiseModel


@pytest.mark.parametrize("kind", noise_mod.available())
def test_acts_on_matches_the_overridden_hooks(kind):
    cls = type(noise_mod.build({"kind": kind}))
    overridden = {what for what, hook in HOOKS.items() if getattr(cls, hook) is not getattr(NoiseModel, hook)}
    assert set(cls.ACTS_ON) == overridden, f"{cls.__name__}.ACTS_ON={sorted(cls.ACTS_ON)}, hooks {sorted(overridden)}"
    assert kind == "none" or cls.ACTS_ON, f"noise={kind} acts on nothing"


def test_unknown_target_is_refused_at_class_definition():
    with pytest.raises(TypeError, match="gradient_matrix"):
        type("Bad", (NoiseModel,), {"ACTS_ON": frozenset({"gradient_matrix"})})


def test_undeclared_hook_is_not_applied():
    """The calibration step follows the declaration, not the class's methods."""

    class Silent(NoiseModel):  # implements a row hook but does not declare it
        kind = "silent"

        def gradients(self, G: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return G * 0

    class Declared(Silent):
        ACTS_ON = frozenset({"gradient_rows"})

    from pruning.gradients import split_blocks
    from pruning.layout import ParamLayout

    G = split_blocks(torch.ones(3, 4), ParamLayout(("a",), ((4,),)), None, torch.arange(3).view(3, 1))
    assert apply_row_noise(G, Silent(), torch.Generator()) is G
    assert not acts_on(Silent(), "gradient_rows") and acts_on(Declared(), "gradient_rows")
    assert torch.equal(apply_row_noise(G, Declared(), torch.Generator()).dense(), torch.zeros(3, 4))
    assert noise_cache_key(Declared(), 7) is None
    assert noise_cache_key(noise_mod.build({"kind": "analog"}), 7)["draw"] == 7
