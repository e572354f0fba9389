"""Length scaling and SLO presets (sloserve.bench.presets), over a hand-made step-time model."""

from __future__ import annotations

import pytest

from sloserve.bench.presets import CHAT, REASONING, LengthScale, SloReference, preset_budgets
from sloserve.slo import Budgets
from sloserve.stepmodel import StepTimeModel

# An engine whose idle decode step is 25 ms (a floor piece) and whose prefill costs 50 us per
# token past the knee: a 2,000-token prompt prefills in about 0.1 s.
MODEL = StepTimeModel(pieces=[(0.025, 0.0, 0.0, 0.0), (0.005, 5e-5, 0.0, 1e-8)])
IDLE = 0.025


# -- length scaling ----------------------------------------------------------------------------


def test_length_scale_factors_floors_and_caps() -> None:
    scale = LengthScale(0.1, 0.5, max_prompt=300, max_output=100, max_model_len=350)
    assert scale.apply(1000, 50) == (100, 25)
    assert scale.apply(3, 1) == (1, 1)  # never below one token
    assert scale.apply(5000, 1000) == (250, 100)  # capped, then the prompt gives way to fit
    assert scale.clipped(5000, 1000) and not scale.clipped(1000, 50)
    assert scale.describe() == {
        "prompt_factor": 0.1,
        "output_factor": 0.5,
        "max_prompt": 300,
        "max_output": 100,
        "max_model_len": 350,
    }
    with pytest.raises(ValueError, match="factors"):
        LengthScale(prompt_factor=0.0)


# -- SLO presets -------------------------------------------------------------------------------


def test_presets_are_multiples_of_the_engine_profile() -> None:
    ref = SloReference(MODEL, chunk_tokens=512)
    long = ref.budgets(CHAT, 2000)
    assert long.tpot_s == pytest.approx(4 * IDLE)
    assert long.ttft_s == pytest.approx(5 * MODEL.prefill_s(2000, 512))
    # A tiny prompt prefills in one idle step: the floor (3 idle steps) holds its TTFT up.
    assert ref.budgets(REASONING, 5).ttft_s == pytest.approx(3 * IDLE)
    thinking = preset_budgets(MODEL, REASONING, 100, thinking_tokens=40)
    assert thinking == Budgets(
        ttft_s=3 * IDLE, tpot_s=4 * IDLE, thinking_tpot_s=2 * IDLE, thinking_tokens=40
    )
