import pytest
import torch

from ssni.evaluate.metrics import draw_accuracy, wilson_interval


def test_wilson_interval_hand_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_expected_and_worst_of_n_hand_values():
    correct = torch.tensor([[1, 1, 1, 1],
                            [1, 0, 1, 1],
                            [0, 0, 0, 0],
                            [1, 1, 0, 1]], dtype=torch.bool)
    m = draw_accuracy(correct)
    assert m["expected"] == pytest.approx(10 / 16)
    assert m["worst_of_n"] == pytest.approx(1 / 4)
    assert m["best_of_n"] == pytest.approx(3 / 4)
    assert m["n"] == 4 and m["draws"] == 4
    assert m["worst_of_n"] <= m["expected"] <= m["best_of_n"]
    assert m["worst_of_n_ci"] == pytest.approx(wilson_interval(1, 4))
