"""EMAG (phema.guidance): the formulas, the layer choice, the negative pass, diffusers models
built from configs (no downloads), the digits demo end to end, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from phema.guidance import EMAG, Schedule  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead, and thrash when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(threads)


def softmax_map(q, k):
    """The attention map computed independently, in float64."""
    s = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1)


def lower_median(x, dim):
    """torch.median's convention (lower middle value), computed with numpy sorting."""
    a = np.sort(x.numpy(), axis=dim)
    return np.take(a, (a.shape[dim] - 1) // 2, axis=dim)


def rand_qkv(gen, b=2, h=3, n=5, d=4):
    return [torch.randn(b, h, n, d, generator=gen) for _ in range(3)]


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("queries", [False, True])
def test_average_after_k_steps_is_the_closed_form(queries):
    beta, k_steps = 0.9, 6
    emag = EMAG([1], beta=beta, queries=queries)
    gen = torch.Generator().manual_seed(0)
    lives = []
    for _ in range(k_steps):
        q, k, v = rand_qkv(gen)
        with emag.positive():
            out = emag.attention(1, q, k, v)
            other = emag.attention(0, q, k, v)  # not a candidate: plain attention
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        assert torch.equal(other, out)
        lives.append(q.double() if queries else softmax_map(q, k))
    expected = beta ** (k_steps - 1) * lives[0]
    for j in range(2, k_steps + 1):
        expected = expected + (1 - beta) * beta ** (k_steps - j) * lives[j - 1]
    got = emag.average(1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    assert emag.memory_bytes() == got.numel() * 4
    assert emag.steps_recorded == k_steps


def test_average_is_fed_only_by_the_recorded_rows():
    emag = EMAG([0], beta=0.5)
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand_qkv(gen, b=4)
    with emag.positive(rows=slice(2, 4)):
        emag.attention(0, q, k, v)
    torch.testing.assert_close(emag.average(0).double(), softmax_map(q[2:], k[2:]))


def test_selection_picks_the_layer_with_the_largest_deviation():
    gen = torch.Generator().manual_seed(2)
    emag = EMAG([3, 5, 7], beta=0.8)
    first = {c: rand_qkv(gen) for c in emag.candidates}
    with emag.positive():
        for c, (q, k, v) in first.items():
            emag.attention(c, q, k, v)
    prev = {c: emag.average(c).double().clone() for c in emag.candidates}
    # Second step: layer 5 changes a lot, the others a little.
    second = {}
    for c, (q, k, v) in first.items():
        scale = 3.0 if c == 5 else 0.05
        second[c] = (q + scale * torch.randn(q.shape, generator=gen), k, v)
    with emag.positive():
        for c, (q, k, v) in second.items():
            emag.attention(c, q, k, v)
    expected = {}
    for c, (q, k, _) in second.items():
        per_head = (prev[c] - softmax_map(q, k)).abs().mean(dim=(0, 2, 3))  # [H]
        expected[c] = float(lower_median(per_head, 0))
        assert emag.score(c).item() == pytest.approx(expected[c], rel=1e-5)
    best = max(expected, key=expected.get)
    assert best == 5
    assert emag.choice().tolist() == [1.0 if c == best else 0.0 for c in emag.candidates]


def test_per_sample_selection_chooses_per_row():
    gen = torch.Generator().manual_seed(3)
    emag = EMAG([0, 1], per_sample=True)
    base = {c: rand_qkv(gen, b=2) for c in (0, 1)}
    with emag.positive():
        for c, (q, k, v) in base.items():
            emag.attention(c, q, k, v)
    with emag.positive():
        for c, (q, k, v) in base.items():
            q = q.clone()
            q[c] += 4.0 * torch.randn(q[c].shape, generator=gen)  # row c moves in layer c
            emag.attention(c, q, k, v)
    assert emag.choice().tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_entropy_selection_picks_the_lowest_entropy():
    gen = torch.Generator().manual_seed(4)
    emag = EMAG([0, 1, 2], selection="entropy")
    qkv = {c: rand_qkv(gen) for c in range(3)}
    qkv[2][0].mul_(8.0)  # sharp maps: low entropy
    with emag.positive():
        for c, (q, k, v) in qkv.items():
            emag.attention(c, q, k, v)
    ent = {}
    for c, (q, k, _) in qkv.items():
        a = softmax_map(q, k)
        per_head = (-(a * a.log()).sum(-1)).mean(dim=(0, 2))
        ent[c] = float(lower_median(per_head, 0))
    assert min(ent, key=ent.get) == 2
    assert emag.choice().tolist() == [0.0, 0.0, 1.0]


def test_fixed_selection_perturbs_every_candidate():
    emag = EMAG([0, 2], selection="fixed")
    gen = torch.Generator().manual_seed(5)
    with emag.positive():
        for c in (0, 2):
            emag.attention(c, *rand_qkv(gen))
    assert emag.choice().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_negative_pass_uses_the_renormalized_average_in_the_chosen_layer(strength):
    gen = torch.Generator().manual_seed(6)
    emag = EMAG([0, 1], beta=0.7, strength=strength)
    steps = [{c: rand_qkv(gen) for c in (0, 1)} for _ in range(3)]
    for step in steps:
        with emag.positive():
            for c, (q, k, v) in step.items():
                emag.attention(c, q, k, v)
    chosen = int(emag.choice().argmax())
    q, k, v = steps[-1][chosen]
    with emag.negative():
        out = emag.attention(chosen, q, k, v)
        other = emag.attention(1 - chosen, *steps[-1][1 - chosen])
    e = emag.average(chosen).double()
    mixed = strength * e / e.sum(-1, keepdim=True) + (1 - strength) * softmax_map(q, k)
    torch.testing.assert_close(out.double(), mixed @ v.double(), atol=1e-5, rtol=1e-5)
    # the other candidate runs plain attention, bit for bit
    assert torch.equal(
        other, torch.nn.functional.scaled_dot_product_attention(*steps[-1][1 - chosen])
    )


def test_emag_q_replaces_the_queries_of_the_chosen_layer():
    gen = torch.Generator().manual_seed(7)
    emag = EMAG([4], queries=True, beta=0.6, strength=0.75)
    for _ in range(3):
        q, k, v = rand_qkv(gen)
        with emag.positive():
            emag.attention(4, q, k, v)
    with emag.negative():
        out = emag.attention(4, q, k, v)
    qt = 0.75 * emag.average(4) + 0.25 * q
    ref = torch.nn.functional.scaled_dot_product_attention(qt, k, v)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_guide_formula_and_its_degenerate_cases():
    gen = torch.Generator().manual_seed(8)
    u, c, n = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    emag = EMAG([0], emag_scale=3.0, cfg_scale=1.5)
    got = emag.guide(u, c, n)
    e_tilde = n + 3.0 * (c - n)
    torch.testing.assert_close(got, u + 1.5 * (e_tilde - u))
    cfg = u + 1.5 * (c - u)
    assert torch.equal(emag.guide(u, c, n, emag_scale=1.0), cfg)  # w_e = 1: CFG exactly
    assert torch.equal(emag.guide(u, c, c), cfg)  # eps' = eps (lambda = 0): CFG exactly
    assert torch.equal(emag.guide(u, c, None), cfg)  # outside the schedule
    torch.testing.assert_close(emag.guide(None, c, n), e_tilde)  # EMAG-only


def test_schedule_windows_and_scaling():
    dit = Schedule.dit()
    assert dit.window(250) == (150, 50)
    active = [i for i in range(250) if dit.active(i, 250)]
    assert active == list(range(99, 200))  # countdown 150 .. 50
    assert dit.window(50) == (30, 10)
    sd3 = Schedule.sd3()
    active = [i for i in range(28) if sd3.active(i, 28)]
    assert active == list(range(5, 23))  # 5 warm-up steps, none in the last 5


def test_no_host_reads_in_a_step():
    # Meta tensors have no data: any .item(), python branch on a value or data-dependent check
    # in the step would raise. The choice stays a tensor on the device.
    for queries in (False, True):
        emag = EMAG([0, 1], queries=queries, per_sample=queries)
        q = torch.randn(2, 2, 6, 4, device="meta")
        for _ in range(2):
            with emag.positive(rows=slice(0, 2)):
                for c in (0, 1, 2):
                    emag.attention(c, q, q, q)
        with emag.negative():
            out = emag.attention(1, q, q, q)
        assert out.device.type == "meta" and emag.choice().device.type == "meta"
        emag.guide(q, q, q)


# ----------------------------------------------------------------------------- digits model


def random_digits_model(seed=0):
    from phema.guidance.digits import DigitsDiT

    torch.manual_seed(seed)
    model = DigitsDiT(width=16, depth=4, heads=2)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at zero: give every weight a value
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_negative_pass_differs_from_the_positive_only_in_the_chosen_layer():
    model = random_digits_model()
    emag = EMAG([1, 2], num_layers=4, beta=0.9)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    y = torch.tensor([1, 4, 7])
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    attention = emag.attention

    def spy(layer_id, q, k, v, **kw):
        out = attention(layer_id, q, k, v, **kw)
        calls.append((layer_id, torch.stack([q, k, v]), out))
        return out

    emag.attention = spy
    with torch.no_grad():
        for t in (900, 700, 500):
            calls.clear()
            with emag.positive():
                model(x, torch.full((3,), t), y, emag)
        pos = list(calls)
        calls.clear()
        with emag.negative():
            model(x, torch.full((3,), 500), y, emag)
        neg = list(calls)
    chosen = emag.candidates[int(emag.choice().argmax())]
    assert [c[0] for c in neg] == [0, 1, 2, 3]
    for (lid, qkv_p, out_p), (_, qkv_n, out_n) in zip(pos, neg):
        if lid < chosen:
            assert torch.equal(qkv_p, qkv_n) and torch.equal(out_p, out_n)
        elif lid == chosen:
            assert torch.equal(qkv_p, qkv_n) and not torch.allclose(out_p, out_n)
        else:  # downstream layers see the perturbed input, and run plain attention on it
            assert not torch.equal(qkv_p, qkv_n)
            q, k, v = qkv_n
            assert torch.equal(out_n, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_digits_sampler_reduces_to_cfg_and_is_deterministic():
    from phema.guidance.digits import make_emag, sample

    model = random_digits_model(1)
    labels = torch.arange(6) % 10
    kw = dict(steps=8, seed=3, batch_size=6)
    cfg, _ = sample(model, labels, None, **kw)
    e1, stats = sample(model, labels, make_emag("emag", emag_scale=1.0), **kw)
    assert torch.equal(cfg, e1)  # w_e = 1: the CFG samples bit for bit
    assert stats.average_bytes > 0
    ea, _ = sample(model, labels, make_emag("emag"), **kw)
    eb, _ = sample(model, labels, make_emag("emag"), **kw)
    assert torch.equal(ea, eb) and not torch.allclose(ea, cfg)
    qa, _ = sample(model, labels, make_emag("emag-q"), **kw)
    assert not torch.allclose(qa, cfg) and not torch.allclose(qa, ea)


def test_lambda_zero_gives_the_unguided_prediction_exactly():
    # EMAG-only guidance (no unconditional pass) on one batch: the negative pass with
    # lambda = 0 is the positive pass, so the guided prediction is the conditional one.
    model = random_digits_model(2)
    emag = EMAG([1, 2], strength=0.0, emag_scale=4.0, num_layers=4)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y, t = torch.tensor([3, 8]), torch.full((2,), 600)
    with torch.no_grad():
        for _ in range(3):
            with emag.positive():
                eps = model(x, t, y, emag)
            with emag.negative():
                neg = model(x, t, y, emag)
            assert torch.equal(neg, eps)
            assert torch.equal(emag.guide(None, eps, neg), eps)


def test_demo_end_to_end(tmp_path, capsys):
    from phema.guidance.digits import run_demo

    rows = run_demo(tmp_path, quick=True, train_steps=20, samples=20)
    for name in ("emag-samples.png", "emag-metrics.png", "emag-metrics.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert {r["method"] for r in rows} == {"cfg", "emag", "emag-q"}
    printed = capsys.readouterr().out
    for method in ("cfg ", "emag ", "emag-q "):
        assert method in printed
    header = (tmp_path / "emag-metrics.csv").read_text().splitlines()[0]
    assert header.startswith("method,cfg_scale,emag_scale,samples,accuracy,fd")


# ----------------------------------------------------------------------------- diffusers


def tiny_dit_pipeline():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    )  # fmt: skip
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
        norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    tr.eval(), vae.eval()  # from_pretrained would do this; dropped labels otherwise
    pipe = diffusers.DiTPipeline(transformer=tr, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_dit(pipe, steps=10, scale=1.5):
    g = torch.Generator().manual_seed(0)
    return pipe(
        class_labels=[1, 2], guidance_scale=scale, num_inference_steps=steps, generator=g,
        output_type="np",
    ).images  # fmt: skip


def test_dit_pipeline_with_emag():
    pipe = tiny_dit_pipeline()
    tr = pipe.transformer
    before = [b.attn1.processor for b in tr.transformer_blocks]
    cfg = run_dit(pipe)
    negatives = []
    with EMAG.dit(candidates=(1, 2)).attach(pipe) as emag:
        assert type(tr.transformer_blocks[1].attn1.processor).__name__ == "EMAGAttnProcessor"
        assert tr.transformer_blocks[0].attn1.processor is before[0]  # fused elsewhere
        h = tr.transformer_blocks[0].register_forward_hook(
            lambda m, a, o: negatives.append(a[0].shape[0])
        )
        a = run_dit(pipe)
        b = run_dit(pipe)  # a second run resets the averages itself
        h.remove()
        assert emag.memory_bytes() == 2 * (2 * 2 * 16 * 16 * 4)  # 2 layers, cond rows only
    # 10 steps: DiT schedule scaled to (6, 2) -> 5 steps with a negative pass of 2 rows
    per_run = negatives[: len(negatives) // 2]
    assert per_run.count(4) == 10 and per_run.count(2) == 5
    assert np.array_equal(a, b)
    assert not np.allclose(a, cfg)
    assert [blk.attn1.processor for blk in tr.transformer_blocks] == before
    assert "forward" not in tr.__dict__
    assert np.array_equal(run_dit(pipe), cfg)  # detached: the plain pipeline again
    with EMAG.dit(candidates=(1, 2), emag_scale=1.0).attach(pipe):
        assert np.array_equal(run_dit(pipe), cfg)  # w_e = 1: CFG exactly
    with EMAG.dit(candidates=(1, 2), queries=True).attach(pipe):
        q = run_dit(pipe)
    assert not np.allclose(q, cfg) and not np.allclose(q, a)


def test_dit_pipeline_emag_only_without_cfg():
    pipe = tiny_dit_pipeline()
    plain = run_dit(pipe, scale=1.0)
    with EMAG.dit(candidates=(2,), emag_scale=1.0).attach(pipe):
        assert np.array_equal(run_dit(pipe, scale=1.0), plain)
    with EMAG.dit(candidates=(2,)).attach(pipe):
        guided = run_dit(pipe, scale=1.0)
    assert not np.allclose(guided, plain)


def tiny_sd3():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4,
    ).eval()  # fmt: skip


def sd3_sample(model, emag, steps=6, seed=0, w=4.0):
    """Flow-matching Euler with CFG (+ EMAG), random text embeddings: our own sampler."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    pooled = torch.randn(2, 8, generator=g)
    text2 = torch.cat([torch.zeros_like(text), text])  # [uncond, cond] like the pipeline
    pooled2 = torch.cat([torch.zeros_like(pooled), pooled])
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = (sigmas[i] * 1000).expand(4)
            kw = dict(encoder_hidden_states=text2, pooled_projections=pooled2, return_dict=False)
            if emag is None:
                out = model(torch.cat([x, x]), timestep=t, **kw)[0]
                eps = out[:2] + w * (out[2:] - out[:2])
            else:
                with emag.positive(rows=slice(2, 4)):
                    out = model(torch.cat([x, x]), timestep=t, **kw)[0]
                neg = None
                if emag.active(i, steps):
                    with emag.negative():
                        neg = model(
                            x, timestep=t[:2], encoder_hidden_states=text,
                            pooled_projections=pooled, return_dict=False,
                        )[0]  # fmt: skip
                eps = emag.guide(out[:2], out[2:], neg, cfg_scale=w)
            x = x + (sigmas[i + 1] - sigmas[i]) * eps
    return x


def test_sd3_transformer_with_our_sampler():
    model = tiny_sd3()
    cfg = sd3_sample(model, None)
    sched = Schedule(start=4, stop=1, base_steps=6)
    with EMAG.sd3(candidates=(1,), schedule=sched).attach(model) as emag:
        a = sd3_sample(model, emag)
        emag.reset()
        b = sd3_sample(model, emag)
        # image-query rows over image and text keys: [cond rows, heads, 16, 16 + 5]
        assert tuple(emag.average(1).shape) == (2, 2, 16, 21)
    with EMAG.sd3(candidates=(1,), schedule=sched, emag_scale=1.0).attach(model) as emag:
        same = sd3_sample(model, emag)
    with EMAG.sd3(candidates=(0, 1), schedule=sched, queries=True).attach(model) as emag:
        q = sd3_sample(model, emag)
    assert torch.equal(a, b)
    assert torch.equal(same, cfg)
    assert not torch.allclose(a, cfg) and not torch.allclose(q, cfg)
    assert torch.equal(sd3_sample(model, None), cfg)  # processors restored


def test_sd3_negative_pass_leaves_text_rows_alone():
    model = tiny_sd3()
    emag = EMAG([1], num_layers=3).attach(model)
    seen = []
    h = model.transformer_blocks[1].attn.register_forward_hook(lambda m, a, o: seen.append(o))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    kw = dict(encoder_hidden_states=text, pooled_projections=torch.randn(2, 8, generator=g))
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0):
            with emag.positive():
                model(x + t / 1000, timestep=torch.full((2,), t), **kw)
        x = x + 0.5
        with emag.negative():
            model(x, timestep=torch.full((2,), 500.0), **kw)
    h.remove()
    emag.detach()
    (img_p, txt_p), (img_n, txt_n) = seen[-2], seen[-1]
    assert torch.equal(txt_p, txt_n) and not torch.allclose(img_p, img_n)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_the_value_named():
    with pytest.raises(ValueError, match=r"beta=1\.0"):
        EMAG([0], beta=1.0)
    with pytest.raises(ValueError, match=r"beta=0\.0"):
        EMAG([0], beta=0.0)
    with pytest.raises(ValueError, match=r"strength=1\.5"):
        EMAG([0], strength=1.5)
    with pytest.raises(ValueError, match=r"strength=-0\.1"):
        EMAG([0], strength=-0.1)
    with pytest.raises(ValueError, match=r"candidates=\[\]"):
        EMAG([])
    with pytest.raises(TypeError, match="candidate layer '2'"):
        EMAG(["2"])
    with pytest.raises(ValueError, match="candidate layer 9: the model has 4"):
        EMAG([9], num_layers=4)
    with pytest.raises(ValueError, match=r"start=10 < stop=20"):
        Schedule(start=10, stop=20)
    with pytest.raises(ValueError, match="selection='median'"):
        EMAG([0], selection="median")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="beta='x'"):
        EMAG([0], beta="x")  # type: ignore[arg-type]
    emag = EMAG([0, 1], num_layers=3)
    q = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="layer_id=3: unknown layer"):
        emag.attention(3, q, q, q)
    with pytest.raises(ValueError, match="layer 7"):
        emag.average(7)
    with pytest.raises(ValueError, match=r"candidate layers \[0, 1\] have no average"):
        with emag.negative():
            pass
    with pytest.raises(TypeError, match="rows=3"):
        with emag.positive(rows=3):  # type: ignore[arg-type]
            pass


def test_batch_change_needs_reset():
    emag = EMAG([0])
    gen = torch.Generator().manual_seed(0)
    with emag.positive():
        emag.attention(0, *rand_qkv(gen, b=2))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 5, 5\).*call reset\(\)"):
        with emag.positive():
            emag.attention(0, *rand_qkv(gen, b=3))
    emag.reset()
    assert emag.memory_bytes() == 0
    with emag.positive():
        emag.attention(0, *rand_qkv(gen, b=3))
    with pytest.raises(ValueError, match="negative pass has batch, heads, query rows 2"):
        with emag.negative():
            emag.attention(0, *rand_qkv(gen, b=2))


def test_attach_twice_and_use_after_detach():
    model = tiny_sd3()
    emag = EMAG([1], num_layers=3).attach(model)
    with pytest.raises(ValueError, match="already attached"):
        emag.attach(model)
    with pytest.raises(ValueError, match="layer 1 already has an EMAG processor"):
        EMAG([1]).attach(model)
    with pytest.raises(ValueError, match="candidate layer 5: SD3Transformer2DModel has 3"):
        EMAG([5]).attach(model)
    with pytest.raises(ValueError, match="num_layers=28"):
        EMAG([1], num_layers=28).attach(model)
    emag.detach()
    for use in (emag.reset, lambda: emag.attach(model), emag.detach, lambda: emag.choice()):
        with pytest.raises(ValueError, match="detached"):
            use()
    with pytest.raises(ValueError, match="detached"):
        with emag.positive():
            pass
    with pytest.raises(TypeError, match="has no transformer_blocks"):
        EMAG([0]).attach(torch.nn.Linear(2, 2))


def test_dit_transformer_negative_pass_changes_only_the_chosen_layer():
    pipe = tiny_dit_pipeline()
    tr = pipe.transformer
    emag = EMAG([1, 2], num_layers=4).attach(tr)  # the transformer alone: processors only
    outs: list[tuple[int, torch.Tensor]] = []
    hooks = [
        blk.attn1.register_forward_hook(lambda m, a, o, i=i: outs.append((i, o)))
        for i, blk in enumerate(tr.transformer_blocks)
    ]
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([3, 5])
    with torch.no_grad():
        for t in (900, 600, 300):
            x = torch.randn(2, 4, 8, 8, generator=g)
            outs.clear()
            with emag.positive():
                tr(x, timestep=torch.full((2,), t), class_labels=labels)
        pos = list(outs)
        outs.clear()
        with emag.negative():
            tr(x, timestep=torch.full((2,), 300), class_labels=labels)
        neg = list(outs)
    for h in hooks:
        h.remove()
    chosen = emag.candidates[int(emag.choice().argmax())]
    emag.detach()
    for (i, o_p), (_, o_n) in zip(pos, neg):
        if i < chosen:
            assert torch.equal(o_p, o_n), i
        else:
            assert not torch.allclose(o_p, o_n), i


def test_import_phema_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, phema; assert 'torch' not in sys.modules and 'phema.guidance' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_demo_emag_flag(tmp_path, monkeypatch):
    import phema.guidance.digits as digits
    from phema.cli import main

    calls = []
    monkeypatch.setattr(digits, "run_demo", lambda **kw: calls.append(kw))
    assert main(["demo", "--emag", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert calls == [{"out": str(tmp_path), "seed": 3}]


def test_sd3_pipeline_with_emag_from_prompt_embeddings():
    # The text encoders cannot be downloaded: the pipeline takes random prompt embeddings.
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, shift_factor=0.0,
    ).eval()  # fmt: skip
    none = dict.fromkeys(
        [
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "text_encoder_3",
            "tokenizer_3",
        ]
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        **none,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    emb = dict(
        prompt_embeds=torch.randn(1, 5, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
    )

    def run():
        return pipe(
            **emb, height=8, width=8, num_inference_steps=6, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip

    cfg = run()
    sched = Schedule(start=4, stop=1, base_steps=6)
    with EMAG.sd3(candidates=(1,), schedule=sched, emag_scale=1.0).attach(pipe):
        assert np.array_equal(run(), cfg)  # w_e = 1: CFG exactly
    with EMAG.sd3(candidates=(1,), schedule=sched).attach(pipe) as emag:
        a, b = run(), run()
        assert emag.memory_bytes() == 1 * 2 * 16 * 21 * 4  # the conditional row only
    assert np.array_equal(a, b) and not np.allclose(a, cfg)
    assert np.array_equal(run(), cfg)


def test_an_interrupted_pipeline_run_does_not_shift_the_next_one(monkeypatch):
    pipe = tiny_dit_pipeline()
    with EMAG.dit(candidates=(1, 2)).attach(pipe):
        clean = run_dit(pipe)
        step = pipe.scheduler.step
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return step(*args, **kwargs)

        monkeypatch.setattr(pipe.scheduler, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_dit(pipe)
        monkeypatch.undo()
        assert np.array_equal(run_dit(pipe), clean)
    assert "set_timesteps" not in pipe.scheduler.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_fp32_averages(dtype):
    for queries in (False, True):
        emag = EMAG([0], queries=queries, beta=0.5)
        gen = torch.Generator().manual_seed(10)
        for _ in range(2):
            q, k, v = (t.to(dtype) for t in rand_qkv(gen))
            with emag.positive():
                emag.attention(0, q, k, v)
        assert emag.average(0).dtype == torch.float32
        with emag.negative():
            out = emag.attention(0, q, k, v)
        assert out.dtype == dtype
        if not queries:
            e = emag.average(0).double()
            ref = (e / e.sum(-1, keepdim=True)) @ v.double()
            torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
