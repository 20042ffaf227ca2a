"""EMAG (phema.guidance): the schedule, the selection statistic, the feeds of the average,
the compositions, diffusers pipelines against the reference's loops written out independently
(tiny models built from configs, float64, no downloads), the digits demo, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from phema.guidance import APG, CADS, EMAG, EMAGPipeline, Schedule, cfg_additive  # noqa: E402


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


def rand_qkv(gen, b=2, h=3, n=5, d=4, dtype=torch.float32):
    return [torch.randn(b, h, n, d, generator=gen, dtype=dtype) for _ in range(3)]


# ----------------------------------------------------------------------------- the reference


class RefAttention:
    """The reference's EMAG attention, written out from its DiT ``Attention`` module and SD3
    ``EMAGAttnProcessor2_0`` (attn_ema_full, no renormalization): a manual softmax map; with
    ``do_ema`` the average of the image-query rows is updated (first map: a copy) and the
    deviation ``mean |E - A|`` kept (after the update for DiT, before it for SD3); with
    ``update`` the rows are replaced by the average (strength 1). Everything in the inputs'
    dtype (float64 here)."""

    def __init__(self, beta, joint, gradient_after_update):
        self.beta, self.joint, self.after = beta, joint, gradient_after_update
        self.do_ema = self.update = False
        self.ema = self.gradient = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):  # fmt: skip
        b = hidden_states.shape[0]
        h = attn.heads
        q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
        d = k.shape[-1] // h
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        n_img = q.shape[2]
        if self.joint and encoder_hidden_states is not None:
            e = encoder_hidden_states
            cq, ck, cv = (f(e).view(b, -1, h, d).transpose(1, 2)
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # fmt: skip
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        probs = torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), dim=-1)
        rows = probs[:, :, :n_img].clone()
        if self.do_ema:
            if self.ema is None:
                self.ema = rows.clone()
                self.gradient = torch.zeros((), dtype=rows.dtype)
            else:
                if not self.after:
                    self.gradient = (self.ema - rows).abs().mean()
                self.ema = self.beta * self.ema + (1 - self.beta) * rows
            if self.after:
                self.gradient = (self.ema - rows).abs().mean()
        if self.update:
            probs = torch.cat([self.ema, probs[:, :, n_img:]], dim=2)
        out = (probs @ v).transpose(1, 2).reshape(b, -1, h * d)
        if self.joint and encoder_hidden_states is not None:
            out, ctx = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
            return attn.to_out[1](attn.to_out[0](out)), ctx
        return attn.to_out[1](attn.to_out[0](out))


def install_reference(model, layers, joint, after):
    procs = {}
    for i in layers:
        blk = model.transformer_blocks[i]
        module = blk.attn if joint else blk.attn1
        procs[i] = RefAttention(0.988, joint, after)
        module.set_processor(procs[i])
    return procs


def pick_largest_gradient(procs):
    """The reference's mode 2: the largest deviation, ties to the first layer (stable sort)."""
    scored = [(float(p.gradient), i) for i, p in procs.items() if p.gradient is not None]
    if not scored:
        return list(procs)
    scored.sort(key=lambda s: s[0], reverse=True)
    return [scored[0][1]]


def tiny_dit(num_layers=16, dtype=torch.float64):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
        norm_num_groups=1,
    )  # fmt: skip
    with torch.no_grad():
        for p in tr.parameters():  # adaLN-Zero starts at zero: give every weight a value
            p.add_(0.05 * torch.randn_like(p))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
        norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    tr, vae = tr.to(dtype).eval(), vae.to(dtype).eval()
    return tr, vae


def tiny_dit_pipeline(num_layers=4, dtype=torch.float32):
    diffusers = pytest.importorskip("diffusers")
    tr, vae = tiny_dit(num_layers, dtype)
    pipe = diffusers.DiTPipeline(transformer=tr, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoder_input(pipe):
    """Capture what the pipeline's VAE decoder gets: the final latents, before any clamping."""
    seen = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    return seen, handle


def reference_dit_latents(tr, labels, steps, cfg, w_e, seed, layers=(12, 13, 14, 15)):
    """The reference's DiT loop (``forward_with_emag``, mode "cond", adaptive mode 2) on the
    diffusers DDIM scheduler: conditional pass and unconditional pass both feed the average
    while stop <= r <= start, the largest deviation (after the unconditional update) is
    replaced while stop <= r <= start - delta in a third conditional pass,
    eps_c' = eps_neg + w_e (eps_c - eps_neg), eps = eps_u + w (eps_c' - eps_u) on the latent
    channels (the reference guides 3 of 4: diffusers' DiTPipeline guides all of them)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.utils.torch_utils import randn_tensor

    start, stop, delta = (round(k * steps / 250) for k in (150, 50, 50))
    procs = install_reference(tr, layers, joint=False, after=True)
    sched = diffusers.DDIMScheduler()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    c = tr.config.in_channels
    x = randn_tensor((len(labels), c, 8, 8), generator=g, dtype=tr.dtype)
    y = torch.tensor(labels)
    y_null = torch.full_like(y, 1000)

    def eps_of(out):
        return out.sample[:, :c]

    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            r = steps - 1 - i
            tt = t.expand(len(labels))
            accumulate = stop <= r <= start
            for p in procs.values():
                p.do_ema = accumulate
            eps_c = eps_of(tr(x, timestep=tt, class_labels=y))
            eps_u = eps_of(tr(x, timestep=tt, class_labels=y_null))
            for p in procs.values():
                p.do_ema = False
            if stop <= r <= start - delta:
                for i_layer in pick_largest_gradient(procs):
                    procs[i_layer].update = True
                eps_n = eps_of(tr(x, timestep=tt, class_labels=y))
                for p in procs.values():
                    p.update = False
            else:
                eps_n = eps_c
            guided_c = eps_n + w_e * (eps_c - eps_n)
            eps = eps_u + cfg * (guided_c - eps_u)
            x = sched.step(eps, t, x).prev_sample
    return x


def test_dit_pipeline_is_the_reference_dit_loop():
    diffusers = pytest.importorskip("diffusers")
    steps, labels = 25, [1, 7]
    tr, vae = tiny_dit()
    ref = reference_dit_latents(tr, labels, steps, 1.5, 3.0, seed=0)
    tr2, _ = tiny_dit()  # the same weights, with their own processors
    pipe = diffusers.DiTPipeline(transformer=tr2, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    seen, handle = decoder_input(pipe)
    run = dict(class_labels=labels, guidance_scale=1.5, num_inference_steps=steps, output_type="pt")
    with EMAG.dit().attach(pipe):
        pipe(generator=torch.Generator().manual_seed(0), **run)
    pipe(generator=torch.Generator().manual_seed(0), **run)  # detached: plain CFG
    handle.remove()
    expected = vae.post_quant_conv(ref / vae.config.scaling_factor)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=0)
    # EMAG moved the samples: the comparison above is not the plain CFG run's.
    assert (seen[1] - expected).abs().max() > 1e-3


def tiny_sd3(num_layers=4, dtype=torch.float64):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return (
        diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=num_layers,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
        )  # fmt: skip
        .to(dtype)
        .eval()
    )


def sd3_pipeline(transformer, scheduler=None):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, shift_factor=0.0,
    ).to(transformer.dtype).eval()  # fmt: skip
    none = dict.fromkeys(
        ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
         "tokenizer_3"]
    )  # fmt: skip
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        **none,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs(batch, dtype=torch.float64, seed=0):
    """Random prompt embeddings (the text encoders cannot be downloaded) and initial latents."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, 5, 16, generator=g, dtype=dtype),
        negative_prompt_embeds=torch.randn(batch, 5, 16, generator=g, dtype=dtype),
        pooled_prompt_embeds=torch.randn(batch, 8, generator=g, dtype=dtype),
        negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g, dtype=dtype),
        latents=torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype),
    )


def reference_sd3_latents(tr, inputs, steps, cfg, w_e, layers, skip_layers=None, slg_scale=2.8):
    """The reference's SD3 loop (``sd3_pipeline``, combo "No", adaptive mode 2): a plain positive
    pass over [uncond, cond]; then ``emag_forward`` over the same batch, which feeds the average
    while k2idx(50) <= r <= k2idx(250) and replaces the layer with the largest previous deviation
    while k2idx(50) <= r <= k2idx(250) - k2idx(50), updating before replacing;
    eps_c' = eps_c_neg + w_e (eps_c - eps_c_neg), eps = eps_u + w (eps_c' - eps_u). With
    `skip_layers`, diffusers' skip-layer guidance term on top, as the pipeline adds it: an
    attached EMAG has put eps_c' in the conditional rows, so the term is (eps_c' - eps_skip)."""
    diffusers = pytest.importorskip("diffusers")

    def k2idx(k):
        return max(0, min(steps - 1, round(k * (steps - 1) / 250)))

    start, stop, delta = k2idx(250), k2idx(50), k2idx(50)
    procs = install_reference(tr, layers, joint=True, after=False)
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    x = inputs["latents"]
    emb = torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]])
    pooled = torch.cat([inputs["negative_pooled_prompt_embeds"], inputs["pooled_prompt_embeds"]])
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            r = steps - 1 - i
            x2, tt = torch.cat([x, x]), t.expand(2 * x.shape[0])
            kw = dict(encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)
            eps_u, eps_c = tr(x2, timestep=tt, **kw)[0].chunk(2)
            do_ema = stop <= r <= start
            do_update = stop <= r <= start - delta
            chosen = pick_largest_gradient(procs) if do_update else []
            for j, p in procs.items():
                p.do_ema, p.update = do_ema, j in chosen
            eps_c_neg = tr(x2, timestep=tt, **kw)[0].chunk(2)[1]
            for p in procs.values():
                p.do_ema = p.update = False
            guided_c = eps_c_neg + w_e * (eps_c - eps_c_neg)
            eps = eps_u + cfg * (guided_c - eps_u)
            if skip_layers is not None and steps * 0.01 < i < steps * 0.2:
                slg = tr(x, timestep=t.expand(x.shape[0]), encoder_hidden_states=emb.chunk(2)[1],
                         pooled_projections=pooled.chunk(2)[1], return_dict=False,
                         skip_layers=skip_layers)[0]  # fmt: skip
                eps = eps + (guided_c - slg) * slg_scale
            x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize(("batch", "skip_layers"), [(1, None), (1, [3]), (2, [3])])
def test_sd3_pipeline_is_the_reference_sd3_loop(batch, skip_layers):
    # Skip-layer guidance calls the transformer a second time in some steps: that call is
    # the plain model, unrecorded, at batch 1 and 2.
    steps = 28
    inputs = sd3_inputs(batch)
    ref = reference_sd3_latents(tiny_sd3(), inputs, steps, 7.0, 1.5, (1, 2), skip_layers)
    pipe = sd3_pipeline(tiny_sd3())
    run = dict(inputs, height=8, width=8, num_inference_steps=steps, guidance_scale=7.0,
               output_type="latent", skip_guidance_layers=skip_layers)  # fmt: skip
    with EMAG.sd3(candidates=(1, 2)).attach(pipe):
        got = pipe(**run).images
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (pipe(**run).images - ref).abs().max() > 1e-3  # detached: plain CFG differs


# ----------------------------------------------------------------------------- the schedule


def test_reference_schedules_and_their_scaling():
    dit = Schedule.dit()
    accumulate = [i for i in range(250) if dit.accumulating(i, 250)]
    replace = [i for i in range(250) if dit.active(i, 250)]
    assert accumulate == list(range(99, 200))  # countdown 150 .. 50
    assert replace == list(range(149, 200))  # countdown 100 .. 50
    sd3 = Schedule.sd3()
    assert [i for i in range(28) if sd3.accumulating(i, 28)] == list(range(23))  # 27 .. 5
    assert [i for i in range(28) if sd3.active(i, 28)] == list(range(5, 23))  # 22 .. 5
    # proportional (phema's default): round(k N / 250); at 50 steps 150, 100, 50 -> 30, 20, 10
    assert dit.accumulation_window(50) == (30, 10) and dit.window(50) == (20, 10)
    # k2idx (the SD3 reference): round(k (N - 1) / 250): 29.4, 19.6, 9.8 at 50 steps
    k2 = Schedule(100, 50, 250, accumulate_start=150, accumulate_stop=50, scaling="k2idx")
    assert k2.accumulation_window(50) == (29, 10) and k2.window(50) == (20, 10)
    ref28 = Schedule(200, 50, 250, accumulate_start=250, accumulate_stop=50, scaling="k2idx")
    assert ref28.accumulation_window(28) == (27, 5) and ref28.window(28) == (22, 5)
    # no accumulation window: every step
    assert all(Schedule(10, 5, 20).accumulating(i, 20) for i in range(20))


# ----------------------------------------------------------------------------- the average


@pytest.mark.parametrize("queries", [False, True])
def test_two_updates_per_step_give_the_closed_form(queries):
    # DiT reference: the conditional rows, then the unconditional rows, feed the average:
    # after the maps M_1 .. M_n (two per step) E = beta^(n-1) M_1 + sum (1 - beta) beta^(n-j) M_j.
    beta, steps = 0.9, 4
    emag = EMAG([1], beta=beta, queries=queries, feed="cond+uncond")
    gen = torch.Generator().manual_seed(0)
    maps = []
    for _ in range(steps):
        q, k, v = rand_qkv(gen, b=4)
        with emag.positive(rows=slice(0, 2), uncond_rows=slice(2, 4)):
            out = emag.attention(1, q, k, v)
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        live = q.double() if queries else softmax_map(q, k)
        maps += [live[:2], live[2:]]
    n = len(maps)
    expected = beta ** (n - 1) * maps[0]
    for j in range(2, n + 1):
        expected = expected + (1 - beta) * beta ** (n - j) * maps[j - 1]
    torch.testing.assert_close(emag.average(1).double(), expected, atol=1e-6, rtol=1e-6)
    assert emag.average(1).dtype == torch.float32 and emag.steps_recorded == steps
    # The score is the deviation of the last (unconditional) map from the average before it.
    before = (expected - (1 - beta) * maps[-1]) / beta
    assert emag.score(1).item() == pytest.approx((before - maps[-1]).abs().mean().item(), 1e-5)


def test_conditional_feed_and_the_accumulation_window():
    emag = EMAG([0], beta=0.5, feed="conditional", schedule=Schedule(1, 1, 4, 2, 1))
    gen = torch.Generator().manual_seed(1)
    recorded = []
    for i in range(4):  # countdown 3, 2, 1, 0: accumulate at 2 and 1 only
        q, k, v = rand_qkv(gen, b=4)
        emag.begin_step(i, 4)
        with emag.positive(rows=slice(2, 4), uncond_rows=slice(0, 2)):
            emag.attention(0, q, k, v)
        if i in (1, 2):
            recorded.append(softmax_map(q[2:], k[2:]))
    expected = 0.5 * recorded[0] + 0.5 * recorded[1]
    torch.testing.assert_close(emag.average(0).double(), expected, atol=1e-6, rtol=1e-6)
    assert emag.steps_recorded == 2


def test_negative_feed_updates_before_replacing_and_chooses_from_the_previous_step():
    gen = torch.Generator().manual_seed(2)
    beta = 0.7
    emag = EMAG([0, 1], beta=beta, feed="negative", schedule=Schedule(1, 0, 3, 2, 0))
    qkv0 = {c: rand_qkv(gen) for c in (0, 1)}
    emag.begin_step(0, 3)  # countdown 2: accumulate, no replacement: the positive pass feeds
    with emag.positive(rows=slice(0, 1)):
        for c, t in qkv0.items():
            emag.attention(c, *t)
    qkv1 = {c: rand_qkv(gen) for c in (0, 1)}
    qkv1[1][0].mul_(5.0)  # layer 1 moves most at step 1 ...
    assert emag.begin_step(1, 3)
    with emag.positive():  # ... but with feed="negative" the positive pass records nothing
        for c, t in qkv1.items():
            emag.attention(c, *t)
    assert emag.steps_recorded == 1
    prev = {c: softmax_map(*qkv0[c][:2]) for c in (0, 1)}
    with emag.negative():
        outs = {c: emag.attention(c, *qkv1[c]) for c in (0, 1)}
    # Both scores were 0 after one map: the choice, fixed before this pass, is the first layer.
    live = {c: softmax_map(*qkv1[c][:2]) for c in (0, 1)}
    after = {c: beta * prev[c] + (1 - beta) * live[c] for c in (0, 1)}
    torch.testing.assert_close(outs[0].double(), after[0] @ qkv1[0][2].double(), atol=1e-5, rtol=0)
    assert torch.equal(outs[1], torch.nn.functional.scaled_dot_product_attention(*qkv1[1]))
    for c in (0, 1):
        torch.testing.assert_close(emag.average(c).double(), after[c], atol=1e-6, rtol=0)
        dev = (prev[c] - live[c]).abs().mean().item()
        assert emag.score(c).item() == pytest.approx(dev, rel=1e-5)
    assert emag.choice().tolist() == [0.0, 1.0]  # the next step would replace layer 1


# ----------------------------------------------------------------------------- selection


def two_layer_state(reduce):
    """Layer 0: one head of four moves far; layer 1: every head moves a little. One mean over
    every entry picks layer 0, the median over heads picks layer 1."""
    emag = EMAG([0, 1], reduce=reduce, beta=0.5, feed="conditional")
    gen = torch.Generator().manual_seed(3)
    base = {c: rand_qkv(gen, h=4, n=6) for c in (0, 1)}
    with emag.positive():
        for c, t in base.items():
            emag.attention(c, *t)
    moved = {}
    for c, (q, k, v) in base.items():
        q = q.clone()
        if c == 0:
            q[:, 0] += 6.0 * torch.randn(q[:, 0].shape, generator=gen)
        else:
            q += 0.25 * torch.randn(q.shape, generator=gen)
        moved[c] = (q, k, v)
    with emag.positive():
        for c, t in moved.items():
            emag.attention(c, *t)
    dev = {c: (softmax_map(*base[c][:2]) - softmax_map(*moved[c][:2])).abs() for c in (0, 1)}
    return emag, dev


def test_selection_is_one_mean_over_every_entry():
    emag, dev = two_layer_state("mean")
    for c in (0, 1):
        assert emag.score(c).item() == pytest.approx(dev[c].mean().item(), rel=1e-5)
    assert emag.choice().tolist() == [1.0, 0.0]


def test_head_median_selection_is_the_named_option():
    emag, dev = two_layer_state("head-median")
    for c in (0, 1):
        per_head = dev[c].mean(dim=(0, 2, 3))
        assert emag.score(c).item() == pytest.approx(float(lower_median(per_head, 0)), rel=1e-5)
    assert emag.choice().tolist() == [0.0, 1.0]


def test_entropy_selection_is_the_median_over_the_batch():
    gen = torch.Generator().manual_seed(4)
    emag = EMAG([0, 1, 2], selection="entropy", feed="conditional")
    qkv = {c: rand_qkv(gen, b=3) for c in range(3)}
    qkv[2][0].mul_(8.0)  # sharp maps: low entropy
    with emag.positive():
        for c, t in qkv.items():
            emag.attention(c, *t)
    ent = {}
    for c, (q, k, _) in qkv.items():
        a = softmax_map(q, k)
        per_row = (-(a * a.log()).sum(-1)).mean(dim=(1, 2))  # [B]
        ent[c] = float(np.median(per_row.numpy()))  # three rows: the middle one
        assert emag.score(c).item() == pytest.approx(ent[c], rel=1e-5)
    assert min(ent, key=ent.get) == 2
    assert emag.choice().tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(("strength", "renormalize"), [(1.0, False), (0.3, False), (1.0, True)])
def test_negative_pass_replaces_the_chosen_layer(strength, renormalize):
    gen = torch.Generator().manual_seed(6)
    emag = EMAG([0, 1], beta=0.7, strength=strength, renormalize=renormalize, feed="conditional")
    steps = [{c: rand_qkv(gen) for c in (0, 1)} for _ in range(3)]
    for step in steps:
        with emag.positive():
            for c, (q, k, v) in step.items():
                emag.attention(c, q, k, v)
    chosen = int(emag.choice().argmax())
    emag.average(chosen).mul_(1.25)  # rows that do not sum to 1: only renormalize fixes them
    q, k, v = steps[-1][chosen]
    with emag.negative():
        out = emag.attention(chosen, q, k, v)
        other = emag.attention(1 - chosen, *steps[-1][1 - chosen])
    e = emag.average(chosen).double()
    if renormalize:
        e = e / e.sum(-1, keepdim=True)
    mixed = strength * e + (1 - strength) * softmax_map(q, k)
    torch.testing.assert_close(out.double(), mixed @ v.double(), atol=1e-5, rtol=1e-5)
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


# ----------------------------------------------------------------------------- compositions


def test_guide_and_additive_cfg_formulas():
    gen = torch.Generator().manual_seed(8)
    u, c, n, un = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    emag = EMAG([0], emag_scale=3.0, cfg_scale=1.5)
    e_tilde = n + 3.0 * (c - n)  # Eq. 14
    torch.testing.assert_close(emag.guide(u, c, n), u + 1.5 * (e_tilde - u))  # Eq. 15
    torch.testing.assert_close(emag.guide(None, c, n), e_tilde)  # EMAG only
    assert torch.equal(emag.guide(u, c, None), u + 1.5 * (c - u))  # outside the window: CFG
    got = cfg_additive(u, c, un, 1.5, 3.0)
    torch.testing.assert_close(got, 1.5 * c - 0.5 * u + 3.0 * (c - un))


def numpy_apg(pairs, scale, eta, threshold, momentum):
    """Adaptive projected guidance, written out in numpy from the reference's formulas."""
    running, outs = None, []
    for xc, xu in pairs:
        xc, xu = xc.numpy(), xu.numpy()
        diff = xc - xu
        running = diff if running is None else diff + momentum * running
        diff = running
        norm = np.sqrt((diff**2).sum(axis=(1, 2, 3), keepdims=True))
        diff = diff * np.minimum(1.0, threshold / norm)
        unit = xc / np.sqrt((xc**2).sum(axis=(1, 2, 3), keepdims=True))
        par = (diff * unit).sum(axis=(1, 2, 3), keepdims=True) * unit
        outs.append(xc + (scale - 1) * ((diff - par) + eta * par))
    return outs


@pytest.mark.parametrize("apg", [APG.dit(), APG(scale=3.0, eta=0.5, norm_threshold=0.0,
                                                momentum=0.3)])  # fmt: skip
def test_apg_against_its_formulas(apg):
    gen = torch.Generator().manual_seed(9)
    pairs = [tuple(3 * torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in "cu")
             for _ in range(3)]  # fmt: skip
    threshold = apg.norm_threshold if apg.norm_threshold > 0 else np.inf
    expected = numpy_apg(pairs, apg.scale, apg.eta, threshold, apg.momentum)
    got = [apg(xc, xu) for xc, xu in pairs]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-10, atol=1e-10)
    apg.reset()
    np.testing.assert_allclose(apg(*pairs[1]).numpy(), numpy_apg(pairs[1:2], apg.scale, apg.eta,
                               threshold, apg.momentum)[0], rtol=1e-10)  # fmt: skip


def test_cads_against_its_formulas():
    cads = CADS(t1=0.4, t2=0.8, noise_scale=0.5, psi=0.0)
    assert [cads.gamma(t) for t in (0.2, 0.4, 0.6, 0.8, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])
    y = torch.randn(4, 16, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert torch.equal(cads(y, 0.3), y)  # gamma 1: the clean condition
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    got = cads(y, 0.6, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, math.sqrt(0.5) * y + 0.5 * math.sqrt(0.5) * n)
    rescaled = CADS(t1=0.4, t2=0.8, noise_scale=0.5, psi=1.0)(y, 0.9)  # gamma 0, psi 1
    assert rescaled.mean().item() == pytest.approx(y.mean().item(), abs=1e-12)
    assert rescaled.std().item() == pytest.approx(y.std().item(), rel=1e-12)


# ----------------------------------------------------------------------------- diffusers


def test_attach_refuses_what_it_cannot_do_right():
    diffusers = pytest.importorskip("diffusers")
    # A scheduler that calls the model twice per step.
    pipe = sd3_pipeline(tiny_sd3(), diffusers.HeunDiscreteScheduler())
    with pytest.raises(ValueError, match="HeunDiscreteScheduler calls the transformer 2 times"):
        EMAG.sd3(candidates=(1,)).attach(pipe)
    assert type(pipe.transformer.transformer_blocks[1].attn.processor).__name__ == (
        "JointAttnProcessor2_0"
    )  # nothing left behind
    # A pipeline whose batch layout cannot be read: PixArt keeps its CFG flag in a local.
    pixart = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=16, caption_channels=16, sample_size=8,
        patch_size=2, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    )  # fmt: skip
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=sd3_pipeline(tiny_sd3(2)).vae,
        transformer=pixart, scheduler=diffusers.DDIMScheduler(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="PixArtAlphaPipeline.*cfg=True or False"):
        EMAG([1]).attach(pipe)
    assert "forward" not in pixart.__dict__
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    emb = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
               negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
               prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
               negative_prompt=None, height=8, width=8, num_inference_steps=8, guidance_scale=4.0,
               output_type="latent", use_resolution_binning=False)  # fmt: skip
    plain = pipe(generator=torch.Generator().manual_seed(0), **emb).images
    with EMAG([1], schedule=Schedule(6, 1, 8)).attach(pipe, cfg=True):  # stated: accepted
        guided = pipe(generator=torch.Generator().manual_seed(0), **emb).images
    assert (guided - plain).abs().max() > 1e-4
    # Flux's attention processor is not one EMAG can wrap: it is named.
    flux = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"candidate layer 0: processor Flux\w+ is not supported"):
        EMAG([0]).attach(flux)


def test_pipeline_call_arguments_are_the_attached_emag():
    pipe = tiny_dit_pipeline()
    run = dict(class_labels=[3, 8], guidance_scale=1.5, num_inference_steps=12, output_type="np")
    with EMAG.dit(candidates=(1, 2), emag_scale=2.0).attach(pipe):
        attached = pipe(generator=torch.Generator().manual_seed(0), **run).images
    plain = pipe(generator=torch.Generator().manual_seed(0), **run).images
    wrapped = EMAGPipeline(pipe)
    got = wrapped(emag_scale=2.0, emag_applied_layers=[1, 2],
                  generator=torch.Generator().manual_seed(0), **run).images  # fmt: skip
    assert np.array_equal(got, attached) and not np.allclose(got, plain)
    assert np.array_equal(wrapped(generator=torch.Generator().manual_seed(0), **run).images, plain)
    assert "forward" not in pipe.transformer.__dict__  # detached after the call
    with pytest.raises(ValueError, match=r"emag_applied_layers=\[1\] without emag_scale"):
        wrapped(emag_applied_layers=[1], **run)


def test_a_second_emag_on_one_pipeline_is_refused_and_detach_restores():
    pipe = tiny_dit_pipeline()
    tr = pipe.transformer
    before = [b.attn1.processor for b in tr.transformer_blocks]
    first = EMAG.dit(candidates=(1,)).attach(pipe)
    with pytest.raises(ValueError, match="already has an EMAG attached"):
        EMAG.dit(candidates=(2,)).attach(pipe)
    with pytest.raises(ValueError, match="already attached"):
        first.attach(pipe)
    first.detach()
    assert [b.attn1.processor for b in tr.transformer_blocks] == before
    assert "forward" not in tr.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    with EMAG.dit(candidates=(2,)).attach(pipe):  # after detach: a new one is welcome
        pass
    assert [b.attn1.processor for b in tr.transformer_blocks] == before


def test_an_interrupted_pipeline_run_does_not_shift_the_next_one(monkeypatch):
    pipe = tiny_dit_pipeline()
    run = dict(class_labels=[1, 2], guidance_scale=1.5, num_inference_steps=10, output_type="np")
    with EMAG.dit(candidates=(1, 2)).attach(pipe):
        clean = pipe(generator=torch.Generator().manual_seed(0), **run).images
        step = pipe.scheduler.step
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return step(*args, **kwargs)

        monkeypatch.setattr(pipe.scheduler, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipe(generator=torch.Generator().manual_seed(0), **run)
        monkeypatch.undo()
        again = pipe(generator=torch.Generator().manual_seed(0), **run).images
    assert np.array_equal(again, clean)
    assert not np.allclose(clean, pipe(generator=torch.Generator().manual_seed(0), **run).images)


def test_dit_transformer_negative_pass_changes_only_the_chosen_layer():
    pipe = tiny_dit_pipeline()
    tr = pipe.transformer
    emag = EMAG([1, 2], num_layers=4, feed="conditional").attach(tr)  # processors only
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


def test_sd3_negative_pass_leaves_text_rows_alone():
    model = tiny_sd3(3, torch.float32)
    emag = EMAG([1], num_layers=3, feed="conditional").attach(model)
    seen = []
    h = model.transformer_blocks[1].attn.register_forward_hook(lambda m, a, o: seen.append(o))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    kw = dict(encoder_hidden_states=text, pooled_projections=torch.randn(2, 8, generator=g))
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0):
            with emag.positive():
                model(x + t / 1000, timestep=torch.full((2,), t), **kw)
        assert tuple(emag.average(1).shape) == (2, 2, 16, 21)  # image rows, image + text keys
        x = x + 0.5
        with emag.negative():
            model(x, timestep=torch.full((2,), 500.0), **kw)
    h.remove()
    emag.detach()
    (img_p, txt_p), (img_n, txt_n) = seen[-2], seen[-1]
    assert torch.equal(txt_p, txt_n) and not torch.allclose(img_p, img_n)


# ----------------------------------------------------------------------------- the rest


def test_no_host_reads_in_a_step():
    # Meta tensors have no data: any .item(), python branch on a value or data-dependent check
    # in the step would raise. The choice stays a tensor on the device.
    for queries, feed in ((False, "cond+uncond"), (True, "negative")):
        emag = EMAG([0, 1], queries=queries, per_sample=queries, feed=feed)
        q = torch.randn(4, 2, 6, 4, device="meta")
        for i in (148, 149):  # countdown 101, 100: inside the DiT accumulation window
            emag.begin_step(i, 250)
            with emag.positive(rows=slice(0, 2), uncond_rows=slice(2, 4)):
                for c in (0, 1, 2):
                    emag.attention(c, q, q, q)
        emag.begin_step(150, 250)
        with emag.negative():
            qn = q if feed == "negative" else q[:2]  # the rows the average was fed from
            out = emag.attention(1, qn, qn, qn)
        assert out.device.type == "meta" and emag.choice().device.type == "meta"
        emag.guide(q, q, q)


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
            ref = emag.average(0).double() @ v.double()
            torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_bad_input_is_refused_with_the_value_named():
    with pytest.raises(ValueError, match=r"beta=1\.0"):
        EMAG([0], beta=1.0)
    with pytest.raises(ValueError, match=r"strength=1\.5"):
        EMAG([0], strength=1.5)
    with pytest.raises(ValueError, match=r"candidates=\[\]"):
        EMAG([])
    with pytest.raises(TypeError, match="candidate layer '2'"):
        EMAG(["2"])
    with pytest.raises(ValueError, match="candidate layer 9: the model has 4"):
        EMAG([9], num_layers=4)
    with pytest.raises(ValueError, match=r"start=10 < stop=20"):
        Schedule(start=10, stop=20)
    with pytest.raises(ValueError, match=r"accumulate_start=20, accumulate_stop=None"):
        Schedule(10, 5, 30, accumulate_start=20)
    with pytest.raises(ValueError, match=r"accumulate_start=8 < start=10"):
        Schedule(10, 5, 30, accumulate_start=8, accumulate_stop=5)
    with pytest.raises(ValueError, match="scaling='linear'"):
        Schedule(scaling="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="selection='median'"):
        EMAG([0], selection="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce='max'"):
        EMAG([0], reduce="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feed='both'"):
        EMAG([0], feed="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"APG norm_threshold=-1"):
        APG(norm_threshold=-1.0)
    with pytest.raises(ValueError, match=r"CADS t1=0\.9, t2=0\.5"):
        CADS(t1=0.9, t2=0.5)
    emag = EMAG([0, 1], num_layers=3)
    q = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="layer_id=3: unknown layer"):
        emag.attention(3, q, q, q)
    with pytest.raises(ValueError, match=r"candidate layers \[0, 1\] have no average"):
        with emag.negative():
            pass
    with pytest.raises(TypeError, match="uncond_rows=3"):
        with emag.positive(uncond_rows=3):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match=r"step=250: need an int in \[0, 250\)"):
        emag.begin_step(250, 250)


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


def test_use_after_detach():
    model = tiny_sd3(3, torch.float32)
    emag = EMAG([1], num_layers=3).attach(model)
    emag.detach()
    for use in (emag.reset, lambda: emag.attach(model), emag.detach, lambda: emag.choice()):
        with pytest.raises(ValueError, match="detached"):
            use()
    with pytest.raises(TypeError, match="has no transformer_blocks"):
        EMAG([0]).attach(torch.nn.Linear(2, 2))


def test_import_phema_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, phema; assert 'torch' not in sys.modules and 'phema.guidance' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- digits demo


def test_demo_end_to_end(tmp_path, capsys):
    import csv

    from phema.guidance.digits import DEMO_RUNS, run_demo

    rows = run_demo(tmp_path, quick=True, train_steps=20, samples=20)
    assert [(r["method"], r["emag_scale"]) for r in rows] == DEMO_RUNS
    assert {r["method"] for r in rows} >= {"cond", "emag-only", "cfg", "emag", "emag-q"}
    for name in ("emag-samples.png", "emag-metrics.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "emag-metrics.csv") as f:
        back = list(csv.DictReader(f))
    assert [(b["method"], float(b["fd"])) for b in back] == [(r["method"], r["fd"]) for r in rows]
    printed = capsys.readouterr().out
    for r in rows:
        assert f"{r['method']:<10}" in printed


def test_cli_demo_emag_steps(tmp_path, monkeypatch, capsys):
    import phema.guidance.digits as digits
    from phema.cli import main

    out = tmp_path / "never"
    assert main(["demo", "--emag", "--steps", "0", "--out", str(out)]) != 0
    assert "--steps 0: need at least 1 training step" in capsys.readouterr().err
    assert not out.exists()
    calls = []
    monkeypatch.setattr(digits, "run_demo", lambda **kw: calls.append(kw))
    assert main(["demo", "--emag", "--out", str(tmp_path), "--seed", "3", "--steps", "40"]) == 0
    assert calls == [{"out": str(tmp_path), "seed": 3, "train_steps": 40}]
