"""Attack views as values: a ViewSpec says what an attack differentiates; RobustClassifier.view builds it."""
import pytest
import torch
from test_perstep import _defense, _images

from ssni.defense import FIXED, VIEWS, AttackView, BareView, BoundSeeds, ViewSpec
from ssni.evaluate.specs import AttackSpec


def test_every_registered_view_is_a_view_spec_and_builds():
    d = _defense(attack_purifier={"sampler": "ddpm", "steps": 2})
    x = _images(4)
    for name in VIEWS.names():
        spec = VIEWS.get(name)
        assert isinstance(spec, ViewSpec)
        view = d.view(name)
        assert isinstance(view, BareView if spec.grad == "none" else AttackView)
        assert view(x, seeds=torch.arange(4)).shape == (4, 3)


def test_attack_specs_resolve_to_one_value_naming_the_purifier():
    d = _defense(attack_purifier={"sampler": "ddpm", "steps": 2})
    own = AttackSpec(view="adaptive", purifier="defense").view_spec()
    cheap = AttackSpec(view="adaptive", purifier="surrogate").view_spec()
    assert own == ViewSpec(purifier="defense", through_t_star=True) and cheap.purifier == "surrogate"
    assert d.view(own).purifier is d.purifier and d.view(cheap).purifier is d.attack_purifier
    assert d.attack_purifier is not d.purifier
    assert AttackSpec(view="bare", purifier="defense").view_spec() == VIEWS.get("bare")
    assert AttackSpec(fixed_seeds=True).view_spec() == FIXED


def test_fixed_view_with_the_defense_seeds_is_the_defense_itself():
    d = _defense(attack_purifier={"sampler": "ddpm", "steps": 2})
    x, seeds = _images(5), torch.arange(10, 15)
    view = d.view(FIXED, seeds=seeds)
    assert isinstance(view, BoundSeeds)
    with torch.no_grad():
        torch.testing.assert_close(view(x), d(x, seeds=seeds), rtol=0, atol=0)
        # EOT copies of the batch: each copy drawn with its sample's seed
        torch.testing.assert_close(view(torch.cat([x, x])), torch.cat([d(x, seeds=seeds)] * 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fixed_seeds view needs the seeds"):
        d.view(FIXED)


def test_a_view_spec_with_a_bad_setting_fails_in_one_line():
    for kw, match in (({"purifier": "attack"}, "purifier must be one of defense, surrogate"),
                      ({"grad": "adjoint"}, "grad must be one of full, bpda, none"),
                      ({"vote": "median"}, "median")):
        with pytest.raises(ValueError, match=match) as e:
            ViewSpec(**kw)
        assert "\n" not in str(e.value)


def test_the_old_surrogate_name_still_works_and_says_it_moved():
    d = _defense()
    with pytest.warns(DeprecationWarning, match="attack_module"):
        m = d.surrogate("full")
    assert m.spec == d.attack_module("full").spec == VIEWS.get("full")


def test_dbp_attack_views_skip_the_score_norm_and_compute_the_same(monkeypatch):
    """With a constant t*, a view that does not differentiate t* needs no score norm: not computed,
    and logits and gradients equal those of a pass that computes it."""
    d = _defense(per_sample_t=False)
    x, seeds = _images(4), torch.arange(4)
    calls = []
    real = type(d.scorer).forward
    monkeypatch.setattr(type(d.scorer), "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for name in ("full", "bpda"):
        xg = x.clone().requires_grad_(True)
        out = d.view(name)(xg, seeds=seeds)
        (g,) = torch.autograd.grad(out.logsumexp(1).sum(), xg)
        assert calls == [], name  # no score-network call for the norm
        # the same view computing the norm (through t*: a constant t* has no gradient to pass on)
        xg2 = x.clone().requires_grad_(True)
        out2 = d.run(xg2, seeds, ViewSpec(grad=VIEWS.get(name).grad, through_t_star=True))
        (g2,) = torch.autograd.grad(out2.logsumexp(1).sum(), xg2)
        assert len(calls) == 1
        calls.clear()
        torch.testing.assert_close(out, out2, rtol=0, atol=0)
        torch.testing.assert_close(g, g2, rtol=0, atol=0)
    with torch.no_grad():
        d(x, seeds=seeds)  # the defense itself still reports its norms
    assert len(calls) == 1 and torch.isfinite(d.last_score_norm).all()
    sample_specific = _defense()
    calls.clear()
    sample_specific.view("full")(x, seeds=seeds)
    assert len(calls) == 1  # SSNI's t* depends on the norm: always computed
