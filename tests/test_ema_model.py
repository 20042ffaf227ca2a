"""The EMA model object users of ema-pytorch (`ema.ema_model`), timm (`ModelEmaV3.module`) and
diffusers (`EMAModel.copy_to`) expect: a copy holding an average, the average written into a
model, or the user's model holding it for a `with` block; tracked profiles or any post-hoc
target, checked against the power EMA computed here step by step."""

from __future__ import annotations

import pytest
import torch

import phema

STEPS = 60


def train(tmp_path, sigma_rels=(0.05, 0.15)):
    """A linear model moved by noise every step; returns the tracker, the model and each step's
    weights (float64) for the averages by hand."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(1)
    history = []
    ema = phema.PostHocEMA(model, tmp_path / "store", sigma_rels, snapshot_every=6)
    for _ in range(STEPS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        history.append({k: v.double().clone() for k, v in model.state_dict().items()})
        ema.update()
    return ema, model, history


def by_hand(history, sigma_rel):
    """The power EMA of EDM2 at the last step: a_t = a_{t-1} + (1 - ((t-1)/t)^(gamma+1)) (w_t -
    a_{t-1}), from its definition, not through phema's accumulators."""
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    avg = None
    for t, w in enumerate(history, start=1):
        step = 1 - ((t - 1) / t) ** (gamma + 1)
        avg = {k: v.clone() for k, v in w.items()} if avg is None else avg
        avg = {k: a + step * (w[k] - a) for k, a in avg.items()}
    return avg


def test_ema_model_is_a_copy_holding_a_tracked_average(tmp_path):
    ema, model, history = train(tmp_path)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    copy = ema.ema_model(0.15)
    assert copy is not model and not copy.training
    assert not any(p.requires_grad for p in copy.parameters())
    want = by_hand(history, 0.15)
    for k, v in copy.state_dict().items():
        torch.testing.assert_close(v.double(), want[k], rtol=0, atol=1e-5)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # The copy is the user's own: training on does not move it.
    ema.update()
    torch.testing.assert_close(copy.weight.double(), want["weight"], rtol=0, atol=1e-5)
    ema.close()


def test_any_post_hoc_target_in_a_copy_a_with_block_or_copied_into_a_model(tmp_path):
    ema, model, history = train(tmp_path)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    want = by_hand(history, 0.1)  # untracked: reconstructed from the snapshots
    spread = max((want[k] - trained[k].double()).abs().max() for k in want)
    copy = ema.ema_model(sigma_rel=0.1)
    for k, v in copy.state_dict().items():
        # Close to the exact EMA (the fit of docs/accuracy.md), far closer than to the weights.
        assert (v.double() - want[k]).abs().max() < 0.05 * spread, k
    with ema.swapped(sigma_rel=0.1) as inside:
        assert inside is model
        assert all(torch.equal(v, copy.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    fresh = torch.nn.Linear(4, 3)
    assert ema.copy_to(fresh, 0.05) is fresh
    tracked = by_hand(history, 0.05)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v.double(), tracked[k], rtol=0, atol=1e-5)
    ema.copy_to(sigma_rel=0.05)  # diffusers' end of training: into the tracked model itself
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="give one target"):
        ema.ema_model()
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))  # names 0.weight, 0.bias
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="Sequential has no tensor bias"):
        ema.copy_to(other, 0.05)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    ema.close()


def test_the_copy_saves_with_save_pretrained_and_loads_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with phema.PostHocEMA(model, tmp_path / "store", (0.05, 0.15), snapshot_every=5) as ema:
        for _ in range(20):
            x = torch.randint(0, 16, (4, 8))
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            ema.update()
        averaged = ema.ema_model(sigma_rel=0.1)  # untracked: post hoc
    averaged.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    x = torch.randint(0, 16, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, averaged(x).logits)
        assert not torch.equal(loaded(x).logits, model.eval()(x).logits)
