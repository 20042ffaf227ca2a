"""What reconstructions carry besides averaged parameters: tied names, float and non-float buffers."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

import phema


class TiedLM(torch.nn.Module):
    """GPT-2 style: the output projection shares the embedding's weight, plus a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.wte(ids)))


def _train(tmp_path, steps: int = 100, every: int = 20):
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = phema.PostHocEMA(model, tmp_path / "store", snapshot_every=every)
    counters = {}
    for step in range(1, steps + 1):
        ids = torch.randint(0, 50, (32,))
        loss = torch.nn.functional.cross_entropy(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        counters[step] = int(model.norm.num_batches_tracked)
    ema.close()
    return model, phema.open_store(tmp_path / "store"), counters


def test_tied_names_reach_every_output_and_load_into_a_fresh_model(tmp_path):
    model, store, _ = _train(tmp_path)
    assert json.loads(store.snapshots[0].metadata["phema.tied"]) == {"lm_head.weight": "wte.weight"}
    [single] = phema.reconstruct(store, sigma_rels=0.1, out=tmp_path / "one", dtype="f32")
    shards = phema.reconstruct(
        store, sigma_rels=0.1, out=tmp_path / "sharded", dtype="f32", shard_size=2000
    )
    index = next(p for p in shards if p.endswith("index.json"))
    with open(index) as f:
        assert json.load(f)["metadata"]["phema.tied"] == store.snapshots[0].metadata["phema.tied"]
    with safe_open(single, "pt") as f:
        assert "phema.tied" in f.metadata() and "lm_head.weight" not in f.keys()  # noqa: SIM118
    for source in (single, tmp_path / "sharded" / "sigma_rel-0.100"):
        fresh = phema.load_into(TiedLM(), source)
        assert fresh.lm_head.weight is fresh.wte.weight
        with safe_open(single, "pt") as f:
            assert torch.equal(fresh.wte.weight.detach(), f.get_tensor("wte.weight"))
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.1)
    assert sd["lm_head.weight"] is sd["wte.weight"]
    TiedLM().load_state_dict(sd)


def test_float_buffers_are_averaged_and_counters_come_from_the_latest_snapshot_before(tmp_path):
    _, store, counters = _train(tmp_path)
    # Between snapshots (60 and 80): the counter of step 60, not of a later snapshot.
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.1, at=70)
    assert int(sd["norm.num_batches_tracked"]) == counters[60]
    # Before the first snapshot the first one is the nearest.
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.2, at=15, allow_poor_fit=True)
    assert int(sd["norm.num_batches_tracked"]) == counters[20]
    # Float buffers take the same mass-preserving weights as parameters: the running variance
    # stays the average of the stored ones, not scaled by the weights' sum.
    sol = phema.solve(store, sigma_rels=0.1, at=70)
    want = sum(
        w
        * phema.reconstruct_state_dict(
            store, gamma=store.snapshots[i].gamma, at=store.snapshots[i].t
        )["norm.running_var"]
        for i, w in enumerate(sol.weights[:, 0])
        if w
    )
    got = phema.reconstruct_state_dict(store, sigma_rel=0.1, at=70)["norm.running_var"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    [path] = phema.reconstruct(store, sigma_rels=0.1, at=70, out=tmp_path / "o")
    with safe_open(path, "pt") as f:
        assert int(f.get_tensor("norm.num_batches_tracked")) == counters[60]


def test_plain_checkpoints_follow_the_same_rules(tmp_path):
    from safetensors.torch import save_file

    # theta(t) = t: a linear trajectory, so the average is exact; `step` is the counter.
    for t in range(100, 1100, 100):
        save_file(
            {"w": torch.full((4,), float(t)), "step": torch.tensor([t])},
            tmp_path / f"step-{t}.safetensors",
        )
    store = phema.open_checkpoints(tmp_path)
    sol = phema.solve(store, sigma_rels=0.2, at=650)
    assert abs(sol.weights.sum() - 1) < 1e-9 and sol.weights[6, 0] > 0  # t = 700 contributes
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.2, at=650)
    assert int(sd["step"]) == 600
    want = sum(w * t for w, t in zip(sol.weights[:, 0], range(100, 1100, 100)))
    torch.testing.assert_close(sd["w"], torch.full((4,), float(want)))
