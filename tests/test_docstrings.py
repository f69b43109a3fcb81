"""The runnable examples in the public API's docstrings run and print what they say (doctest)."""
import doctest
import importlib

import pytest

MODULES = ["ssni.help", "ssni.evaluate.jobs", "ssni.purify.config", "ssni.scoring.score_norm",
           "ssni.scoring.calibration", "ssni.scoring.reweight", "ssni.defense", "ssni.attacks.pgd",
           "ssni.attacks.eot", "ssni.models.factory", "ssni.models.load"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest lines failed"
