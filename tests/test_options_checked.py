"""A misspelt option of any registered part fails when the recipe loads (before any network is built),
in one line that lists the valid options."""
import pytest

from ssni.cli import main

# (registry, command line, what the one line must say)
CASES = [
    ("model", ["train-score", "recipes/score/digits.yaml", "model.kwargs.chx=4"],
     "model.kwargs: model 'unet_digits' has no option 'chx'; its options: in_channels="),
    ("sampler", ["purify", "recipes/purify/digits.yaml", "input=x", "purifier.sampler=ddpm", "purifier.dt=0.1"],
     "sampler 'ddpm' has no option 'dt'; its options: steps, clip"),
    ("reweight", ["evaluate", "recipes/eval/digits.yaml", "defenses.1.reweight.kwargs.t_bas=0.2"],
     "reweight.kwargs: reweight 'constant' has no option 't_bas'; its options: t_base=0.1, t_min=0.0"),
    ("attack", ["evaluate", "recipes/eval/digits.yaml", "attacks.0.kwargs.stepz=3"],
     "attacks[0] ('pgd-eot'): attack 'pgd' has no option 'stepz'; its options: eps="),
    ("noise sampler", ["train-score", "recipes/score/digits_ts.yaml", "noise.kwargs.epz=0.1"],
     "noise.kwargs: noise sampler 'typical_set' has no option 'epz'; its options:"),
    ("denoiser attack", ["evaluate-denoiser", "recipes/denoiser/evaluate_photos.yaml", "attacks.0.method=pgx"],
     "unknown denoiser attack 'pgx'; valid choices: pgd, random"),
    ("dataset", ["train-score", "recipes/score/digits.yaml", "data.name=fashionmnist"],
     "unknown dataset 'fashionmnist'; valid choices: cifar10, digits, fashion_mnist"),
]


@pytest.mark.parametrize("kind,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_misspelt_option_fails_in_one_line_before_anything_loads(kind, argv, expected, capsys, monkeypatch):
    import ssni.models.factory as factory

    def no_network(*a, **k):  # nothing may be built: the config check comes first
        raise AssertionError("a network was built before the options were checked")

    monkeypatch.setattr(factory.MODELS, "create", no_network)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_every_registry_with_options_is_covered():
    """A new registry of configurable parts needs a row above."""
    covered = {c[0] for c in CASES}
    assert covered >= {"model", "sampler", "reweight", "attack", "noise sampler", "denoiser attack", "dataset"}
