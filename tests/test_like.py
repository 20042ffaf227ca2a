"""`like=` outputs (docs/outputs.md): reconstructions laid out as a transformers or diffusers
checkpoint load with `from_pretrained` and hold exactly `reconstruct_state_dict`'s weights;
`load_into` takes those directories and Lightning-style prefixed names."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open

import phema
from phema.cli import main

transformers = pytest.importorskip("transformers")


def _train_gpt2(root, dtype=torch.float32, steps=24):
    """A 2-layer GPT-2 from a config, trained a little while PostHocEMA tracks it; returns the
    store and the model's save_pretrained directory."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    store = os.path.join(root, "ema")
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with phema.PostHocEMA(model, store, sigma_rels=(0.05, 0.1), snapshot_every=4) as ema:
        for _ in range(steps):
            x = torch.randint(0, 64, (4, 8))
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            ema.update()
        ema.snapshot()
    ckpt = os.path.join(root, "checkpoint-24")
    model.to(dtype).save_pretrained(ckpt)
    return phema.open_store(store), ckpt, model


def _weights(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def test_gpt2_like_output_loads_with_from_pretrained_and_gives_load_into_logits(tmp_path):
    store, ckpt, model = _train_gpt2(tmp_path)
    # What a Trainer's checkpoint-N/ holds besides the model: never copied.
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (tmp_path / "checkpoint-24" / name).write_bytes(b"state")
    (tmp_path / "checkpoint-24" / "trainer_state.json").write_text("{}")
    tokenizer = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "vocab.json": "{}"}
    tokenizer |= {"merges.txt": "#version: 0.2\n", "special_tokens_map.json": "{}"}
    for name, text in tokenizer.items():
        (tmp_path / "checkpoint-24" / name).write_text(text)

    paths = phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "recon", like=ckpt)
    target = tmp_path / "recon" / "sigma_rel-0.080"
    expected = {"model.safetensors", "config.json", "generation_config.json", "README.md"}
    expected |= set(tokenizer)
    assert set(os.listdir(target)) == expected
    assert sorted(paths) == sorted(str(target / n) for n in expected)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(target)
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.08)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k  # float32 like the checkpoint
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    phema.load_into(model.float(), target)
    x = torch.randint(0, 64, (2, 8))
    loaded.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_like_takes_the_checkpoints_dtype_unless_told_and_its_shards(tmp_path):
    store, ckpt, _ = _train_gpt2(tmp_path, dtype=torch.bfloat16)
    phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "a", like=ckpt)
    got = _weights(tmp_path / "a" / "sigma_rel-0.080")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "b", like=ckpt, dtype="f32")
    assert {v.dtype for v in _weights(tmp_path / "b" / "sigma_rel-0.080").values()} == {
        torch.float32
    }

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(
        sharded, max_shard_size="5KB"
    )
    assert os.path.exists(sharded / "model.safetensors.index.json")
    phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "c", like=sharded)
    target = tmp_path / "c" / "sigma_rel-0.080"
    names = os.listdir(target)
    assert "model.safetensors.index.json" in names and "model-00001-of-" in " ".join(names)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.08, dtype=torch.bfloat16)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_diffusers_unet_like_output_loads_with_from_pretrained(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    opt = torch.optim.SGD(unet.parameters(), lr=0.05)
    with phema.PostHocEMA(unet, tmp_path / "ema", sigma_rels=(0.05, 0.1), snapshot_every=3) as ema:
        for step in range(12):
            x = torch.randn(2, 1, 8, 8)
            unet(x, step).sample.square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()
    unet.save_pretrained(tmp_path / "unet")
    assert "diffusion_pytorch_model.safetensors" in os.listdir(tmp_path / "unet")
    store = phema.open_store(tmp_path / "ema")
    assert (
        main(
            [
                "reconstruct",
                str(tmp_path / "ema"),
                "--sigma-rel",
                "0.08",
                "--out",
                str(tmp_path / "r"),
                "--like",
                str(tmp_path / "unet"),
                "-q",
                "--allow-poor-fit",
            ]
        )
        == 0
    )
    target = tmp_path / "r" / "sigma_rel-0.080"
    assert set(os.listdir(target)) == {
        "diffusion_pytorch_model.safetensors",
        "config.json",
        "README.md",
    }
    loaded = diffusers.UNet2DModel.from_pretrained(target)
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.08, allow_poor_fit=True)
    assert set(loaded.state_dict()) == set(sd)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # load_into takes a diffusers directory as it is.
    phema.load_into(unet, target)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, sd[k]), k

    # A sharded diffusers checkpoint gives shards named as diffusers names them.
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    phema.reconstruct(
        store,
        sigma_rels=[0.08],
        out=tmp_path / "r2",
        like=tmp_path / "sharded",
        allow_poor_fit=True,
    )
    target = tmp_path / "r2" / "sigma_rel-0.080"
    written = sorted(os.listdir(target))
    assert "diffusion_pytorch_model.safetensors.index.json" in written
    shards = [n for n in written if n.endswith(".safetensors")]
    assert len(shards) > 1
    assert all(
        re.fullmatch(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors", n) for n in shards
    )
    loaded = diffusers.UNet2DModel.from_pretrained(target)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    phema.load_into(unet, tmp_path / "sharded")  # load_into reads diffusers' index


def test_like_refuses_another_models_checkpoint_and_outputs_inside_it(tmp_path, capsys):
    store, ckpt, _ = _train_gpt2(tmp_path)
    other = tmp_path / "other"
    config = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(other)
    with pytest.raises(ValueError, match=r"missing 12 \(e\.g\. transformer\.h\.2"):
        phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "o", like=other)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="inside the input"):
        phema.reconstruct(store, sigma_rels=[0.08], out=os.path.join(ckpt, "sub"), like=ckpt)
    with pytest.raises(ValueError, match="per_rank and shard_size"):
        phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "o", like=ckpt, shard_size=10)
    capsys.readouterr()
    code = main(
        [
            "reconstruct",
            store.path,
            "--sigma-rel",
            "0.08",
            "--out",
            str(tmp_path / "o"),
            "--like",
            str(tmp_path / "nowhere"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and err.count("\n") == 1
    # The engine failing (a snapshot truncated after listing) leaves no target directory.
    last = store.snapshots[-1].path
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 64)
    with pytest.raises(ValueError):
        phema.reconstruct(store, sigma_rels=[0.08], out=tmp_path / "o", like=ckpt)
    assert not (tmp_path / "o").exists()  # nor the directory made for it


def test_load_into_strips_or_adds_a_prefix(tmp_path):
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    wrapped = torch.nn.Module()
    wrapped.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    lightning_names = {k: v.clone() for k, v in wrapped.state_dict().items()}  # model.0.weight, ...
    phema.load_into(inner, lightning_names, strip_prefix="model.")
    for k, v in inner.state_dict().items():
        assert torch.equal(v, lightning_names["model." + k])
    torch.nn.init.zeros_(wrapped.model[0].weight)
    plain = {k: torch.randn_like(v) for k, v in inner.state_dict().items()}
    from safetensors.torch import save_file

    save_file(plain, tmp_path / "w.safetensors")
    phema.load_into(wrapped, tmp_path / "w.safetensors", prefix="model.")
    for k, v in wrapped.model.state_dict().items():
        assert torch.equal(v, plain[k])
    with pytest.raises(ValueError, match="missing 4"):
        phema.load_into(inner, lightning_names)  # the prefix not stripped: nothing matches
    with pytest.raises(ValueError, match="two tensors load into `0.weight`"):
        phema.load_into(
            inner, {**lightning_names, "0.weight": plain["0.weight"]}, strip_prefix="model."
        )
    with pytest.raises(ValueError, match="prefix=3"):
        phema.load_into(inner, plain, prefix=3)


def test_hf_checkpoints_are_plain_checkpoints_for_open_checkpoints(tmp_path):
    """README's example: Trainer checkpoint-N/ directories average post hoc as they are."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    runs = tmp_path / "out"
    saved = {}
    for step in (10, 20, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        model.save_pretrained(runs / f"checkpoint-{step}")
        (runs / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"x")
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    store = phema.open_checkpoints(runs)
    assert [s.t for s in store.snapshots] == [10, 20, 30]
    json.dumps(phema.solve(store, sigma_rels=[0.2]).to_json())


def test_a_trainer_output_dir_with_the_callbacks_store_reconstructs_from_its_checkpoints(
    tmp_path, capsys
):
    """README's `phema reconstruct out/ --checkpoints … --like …` on a directory the Hugging Face
    callback wrote to: its store `out/phema/` and the logs beside the checkpoints are no
    checkpoints; each is named in a note, and the output loads with `from_pretrained`."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    runs = tmp_path / "out"
    with phema.PostHocEMA(model, runs / "phema", sigma_rels=(0.05, 0.1), snapshot_every=1) as ema:
        for step in (10, 20, 30):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            ema.update()
            model.save_pretrained(runs / f"checkpoint-{step}")
    (runs / "runs").mkdir()
    (runs / "runs" / "events.out.tfevents.1").write_bytes(b"log")
    args = ["reconstruct", str(runs), "--checkpoints", "--sigma-rel", "0.2", "--allow-poor-fit"]
    assert main([*args, "--like", str(runs / "checkpoint-30"), "--out", str(tmp_path / "ema")]) == 0
    out = capsys.readouterr().out
    assert f"note: ignored {runs / 'phema'}: a phema store" in out
    assert f"note: ignored {runs / 'runs'}: no .safetensors file" in out
    store = phema.open_checkpoints(runs)
    assert [s.t for s in store.snapshots] == [10, 20, 30]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ema" / "sigma_rel-0.200")
    assert loaded.dtype == torch.float32  # the checkpoints' own dtype
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.2, allow_poor_fit=True)
    got = loaded.state_dict()
    assert sd and all(torch.equal(got[k], v) for k, v in sd.items())
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_the_sweeps_winner_and_an_average_load_with_from_pretrained_in_the_models_dtype(
    tmp_path, capsys
):
    """Every command that writes weights takes `like`; without it they keep the model's dtype
    (a float32 model's winner is float32; fp16 is only the snapshots' format)."""
    store, ckpt, model = _train_gpt2(tmp_path)
    x = torch.randint(0, 64, (2, 8))

    def evaluate(m):
        with torch.no_grad():
            return {"loss": float(m(x, labels=x).loss)}

    result = phema.sweep(store, model, evaluate, sigma_rels=[0.05, 0.08], progress=False)
    best = result.best("loss")
    result.save_best(tmp_path / "plain", "loss")
    assert {v.dtype for v in _weights(tmp_path / "plain").values()} == {torch.float32}
    written = result.save_best(tmp_path / "best", "loss", like=ckpt)
    target = os.path.commonpath(written)
    assert {"model.safetensors", "config.json"} <= set(os.listdir(target))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
    phema.load_into(model, best.state_dict)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)

    # An average of two checkpoints, laid out like one: config.json beside model.safetensors.
    other = tmp_path / "checkpoint-12"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    model.save_pretrained(other)
    args = ["average", ckpt, str(other), "--like", ckpt, "--out", str(tmp_path / "soup")]
    assert main(args) == 0
    assert "config.json" in capsys.readouterr().out
    soup = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "soup").eval()
    first = transformers.AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    second = model.state_dict()
    for k, v in soup.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, (first[k] + second[k]) / 2, rtol=0, atol=1e-6)
    with torch.no_grad():
        model.load_state_dict({k: (first[k] + second[k]) / 2 for k in first})
        torch.testing.assert_close(soup(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
