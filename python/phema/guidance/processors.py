"""EMAG inside diffusers: attention processors for candidate layers and a transformer forward
that runs the negative pass for a pipeline (docs/guidance.md, "diffusers").

Only candidate layers get a new processor; every other layer keeps its own (fused) one. A
candidate's processor computes exactly what the processor it replaces computes (the standard
``AttnProcessor2_0`` self-attention of DiT blocks, or SD3's ``JointAttnProcessor2_0``) and hands
q, k, v to :meth:`phema.guidance.EMAG.attention`; outside EMAG's passes it calls the original
processor itself, so a model with EMAG attached but idle gives bit-identical outputs.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class Guidance(Protocol):
    """What the processors and the pipeline forward use of a :class:`phema.guidance.EMAG`
    (a protocol, so that this module needs no import of the one that imports it)."""

    num_layers: int | None

    @property
    def candidates(self) -> tuple[int, ...]: ...
    @property
    def feed(self) -> str: ...
    @property
    def _mode(self) -> str: ...

    def attention(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None = ..., scale: float | None = ...,
                  query_rows: int | None = ...) -> torch.Tensor: ...  # fmt: skip
    def reset(self) -> None: ...
    def begin_step(self, step: int, num_steps: int) -> bool: ...
    def positive(
        self, rows: slice | None = ..., uncond_rows: slice | None = ...
    ) -> AbstractContextManager[Any]: ...
    def negative(self) -> AbstractContextManager[Any]: ...
    def guide(self, eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor,
              eps_neg: torch.Tensor | None) -> torch.Tensor: ...  # fmt: skip


def _processor_kinds() -> tuple[type, type]:
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    return AttnProcessor2_0, JointAttnProcessor2_0


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of each transformer block, in order: block i is layer i
    (``attn1`` of DiT's BasicTransformerBlock, ``attn`` of SD3's JointTransformerBlock)."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(
            f"{type(model).__name__} has no transformer_blocks; use EMAG.attention() in your own "
            "attention code instead"
        )
    layers = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn1", None)
        if attn is None:
            attn = getattr(block, "attn", None)
        if attn is None:
            raise TypeError(f"transformer block {i} ({type(block).__name__}) has no attn1/attn")
        layers.append(attn)
    return layers


class EMAGAttnProcessor:
    """Processor for one candidate layer: the computation of the processor it replaces, with
    EMAG's recording (positive pass) or perturbation (negative pass)."""

    def __init__(self, emag: Guidance, layer_id: int, original: Any, joint: bool) -> None:
        self.emag = emag
        self.layer_id = layer_id
        self.original = original
        self.joint = joint

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if self.emag._mode == "idle":
            extra = {} if temb is None else {"temb": temb}
            # (extra positional arguments are the deprecated `scale`, which processors ignore)
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **extra,
                **kwargs,
            )
        if self.joint:
            return self._joint(attn, hidden_states, encoder_hidden_states)
        return self._self(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _self(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        # The computation of diffusers' AttnProcessor2_0 for self-attention.
        if encoder_hidden_states is not None:
            raise ValueError(f"EMAG layer {self.layer_id}: cross-attention cannot be a candidate")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value, head_dim = _heads(attn, hidden_states, batch)
        out = self.emag.attention(self.layer_id, query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _joint(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> Any:
        # The computation of diffusers' JointAttnProcessor2_0 (SD3's MMDiT blocks).
        batch = hidden_states.shape[0]
        n_img = hidden_states.shape[1]
        query, key, value, head_dim = _heads(attn, hidden_states, batch)
        if encoder_hidden_states is not None:
            cq = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            ck = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            cv = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            cq, ck, cv = cq.transpose(1, 2), ck.transpose(1, 2), cv.transpose(1, 2)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query = torch.cat([query, cq], dim=2)
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)
        out = self.emag.attention(self.layer_id, query, key, value, query_rows=n_img)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if context is not None:
            return out, context
        return out


class Attachment:
    """What :meth:`EMAG.attach` changed, so :meth:`restore` can put it back exactly."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.processors: list[tuple[Any, Any]] = []
        self.transformer: torch.nn.Module | None = None
        self.had_forward = False
        self.old_forward: Any = None
        self.scheduler: Any = None
        self.old_set_timesteps: Any = None

    def restore(self) -> None:
        """Put back the original processors and transformer forward."""
        for module, original in reversed(self.processors):
            module.set_processor(original)
        self.processors.clear()
        if self.transformer is not None:
            if self.had_forward:
                self.transformer.forward = self.old_forward
            else:
                del self.transformer.forward
            self.transformer = None
        if self.scheduler is not None:
            if self.old_set_timesteps is not None:
                self.scheduler.set_timesteps = self.old_set_timesteps
            else:
                del self.scheduler.set_timesteps
            self.scheduler = None
        self.model.__dict__.pop(_MARK, None)


# The attribute a model carries while an EMAG is attached to it.
_MARK = "_phema_emag"


def attach(emag: Guidance, target: Any, *, cfg: bool | None, cond_first: bool | None) -> Attachment:
    """Install EMAG's processors on the candidate layers of `target` (a pipeline with a
    ``transformer`` or a transformer model); for a pipeline also its guided forward."""
    self_kind, joint_kind = _processor_kinds()
    is_pipeline = not isinstance(target, torch.nn.Module) and hasattr(target, "transformer")
    model = target.transformer if is_pipeline else target
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"attach({type(target).__name__}): need a diffusers pipeline or transformer"
        )
    other = model.__dict__.get(_MARK)
    if other is not None:
        raise ValueError(
            f"{type(model).__name__} already has an EMAG attached ({other!r}); detach() it "
            "before attaching another"
        )
    layers = attention_layers(model)
    if emag.num_layers is None:
        emag.num_layers = len(layers)
    elif emag.num_layers != len(layers):
        raise ValueError(
            f"EMAG was made for num_layers={emag.num_layers}; {type(model).__name__} has "
            f"{len(layers)} attention layers"
        )
    planned = []
    for lid in emag.candidates:
        if lid >= len(layers):
            raise ValueError(
                f"candidate layer {lid}: {type(model).__name__} has {len(layers)} attention layers"
            )
        module = layers[lid]
        original = module.get_processor() if hasattr(module, "get_processor") else None
        if isinstance(original, joint_kind):
            joint = True
        elif isinstance(original, self_kind):
            joint = False
            if getattr(module, "is_cross_attention", False):
                raise ValueError(f"candidate layer {lid} is cross-attention")
        else:
            raise TypeError(
                f"candidate layer {lid}: processor {type(original).__name__} is not supported "
                "(AttnProcessor2_0 or JointAttnProcessor2_0). Wrapping it would take a "
                "processor that computes what it computes and hands its q, k, v to "
                "EMAG.attention(); write that for your model, or set_processor("
                "AttnProcessor2_0()) on the candidate layers first"
            )
        planned.append((module, original, lid, joint))
    name = type(target).__name__
    if is_pipeline and cfg is None and not _knows_cfg(target):
        raise ValueError(
            f"attach({name}): this pipeline has no do_classifier_free_guidance attribute, so "
            "whether its batch holds an unconditional half cannot be read; say it: "
            "attach(pipe, cfg=True or False, cond_first=...) (cfg=True when guidance_scale > 1)"
        )
    if is_pipeline:
        _check_scheduler(target)
    att = Attachment(model)
    for module, original, lid, joint in planned:
        module.set_processor(EMAGAttnProcessor(emag, lid, original, joint))
        att.processors.append((module, original))
    if is_pipeline:
        _install_forward(emag, target, model, att, cfg=cfg, cond_first=cond_first)
    model.__dict__[_MARK] = emag
    return att


def _knows_cfg(pipe: Any) -> bool:
    """Whether the batch layout can be read from the pipeline: a ``do_classifier_free_guidance``
    attribute, or DiT's class labels (null class 1000 in the second half)."""
    return hasattr(type(pipe), "do_classifier_free_guidance") or type(pipe).__name__.startswith(
        "DiT"
    )


def _check_scheduler(pipe: Any) -> None:
    scheduler = getattr(pipe, "scheduler", None)
    order = getattr(scheduler, "order", 1)
    if order != 1:
        raise ValueError(
            f"EMAG: {type(scheduler).__name__} calls the transformer {order} times per step "
            f"(scheduler order {order}); an attached EMAG maps one call to one step: use a "
            "first-order scheduler (DDIM, Euler, FlowMatchEuler, DPM-Solver) or drive the "
            "transformer yourself with EMAG.positive() / negative()"
        )


def _step_index(scheduler: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The scheduler's index of the step this transformer call belongs to: its ``step_index``
    (None before the first step: the run's begin index), or for schedulers that keep none
    (DDIM, DDPM; first order, so every timestep is distinct) the timestep's position."""
    if hasattr(scheduler, "step_index"):
        idx = scheduler.step_index
        if idx is None:
            idx = getattr(scheduler, "begin_index", None) or 0
        return int(idx)
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    t = t.reshape(-1)[0].to(scheduler.timesteps.device, scheduler.timesteps.dtype)
    hits = (scheduler.timesteps == t).nonzero()
    if hits.numel() != 1:
        raise ValueError(
            f"EMAG: timestep {t.item()} is not one step of {type(scheduler).__name__}'s "
            "timesteps; drive the transformer yourself with EMAG.positive() / negative()"
        )
    return int(hits[0, 0])


def _install_forward(
    emag: Guidance,
    pipe: Any,
    model: torch.nn.Module,
    att: Attachment,
    *,
    cfg: bool | None,
    cond_first: bool | None,
) -> None:
    """Replace the transformer's forward (on the instance) by one that runs the positive pass,
    the negative pass when the schedule says so, and puts
    ``eps~' = eps + (w_e - 1)(eps - eps')`` in the conditional rows; the pipeline's own CFG
    then gives ``eps_u + w (eps~' - eps_u)``. Each call is mapped to the scheduler's step; a
    further call in the same step (skip-layer guidance) runs the plain model."""
    name = type(pipe).__name__
    if cond_first is None:
        # DiTPipeline batches [cond, uncond]; SD3, PixArt and most others [uncond, cond].
        cond_first = name.startswith("DiT")
    config = getattr(model, "config", None)
    in_ch = getattr(config, "in_channels", None)
    out_ch = getattr(config, "out_channels", None)
    # Learned sigma (DiT, PixArt): the pipeline guides only the first in_channels channels.
    channels = in_ch if (in_ch is not None and out_ch == 2 * in_ch) else None
    old = model.__dict__.get("forward")
    att.had_forward, att.old_forward = old is not None, old
    original_forward = model.forward
    params = list(inspect.signature(original_forward).parameters)
    state: dict[str, Any] = {"last": None, "cfg": None}

    def uses_cfg(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> bool:
        if cfg is not None:
            return cfg
        flag = getattr(pipe, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag
        labels = kwargs.get("class_labels")
        if labels is None and "class_labels" in params:
            i = params.index("class_labels")
            labels = args[i] if i < len(args) else None
        if torch.is_tensor(labels) and batch % 2 == 0:
            # DiTPipeline's null class is 1000: one host read per sampling run, at its first step.
            return bool((labels[batch // 2 :] == 1000).all())
        return False

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("hidden_states")
        if not torch.is_tensor(x):
            raise TypeError("EMAG: the transformer's first input must be the latent batch")
        scheduler = pipe.scheduler
        _check_scheduler(pipe)
        step = _step_index(scheduler, args, kwargs)
        last = state["last"]
        if kwargs.get("skip_layers") is not None or step == last:
            # Not the step's positive pass (skip-layer guidance): the plain model, unrecorded.
            return original_forward(*args, **kwargs)
        batch = x.shape[0]
        if last is None or step < last:
            emag.reset()
            state["cfg"] = uses_cfg(args, kwargs, batch)
        state["last"] = step
        num_steps = len(scheduler.timesteps)
        if state["cfg"]:
            half = batch // 2
            rows = slice(0, half) if cond_first else slice(half, batch)
            uncond = slice(half, batch) if cond_first else slice(0, half)
        else:
            rows, uncond = slice(0, batch), None
        active = emag.begin_step(step, num_steps)
        with emag.positive(rows=rows, uncond_rows=uncond):
            out = original_forward(*args, **kwargs)
        if not active:
            return out
        if emag.feed == "negative":
            # The SD3 reference's negative pass: the whole batch, both branches.
            with emag.negative():
                neg = _sample(original_forward(*args, **kwargs))[rows]
        else:
            sub_args = tuple(_rows(a, rows, batch) for a in args)
            sub_kwargs = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
            with emag.negative():
                neg = _sample(original_forward(*sub_args, **sub_kwargs))
        eps = _sample(out)
        c = slice(None) if channels is None else slice(0, channels)
        guided = emag.guide(None, eps[rows, c], neg[:, c])
        eps = eps.clone()
        eps[rows, c] = guided
        return _with_sample(out, eps)

    model.forward = forward
    att.transformer = model

    # A pipeline sets its scheduler's timesteps once at the start of every run: that starts a
    # new run here too, even after an interrupted one.
    scheduler = getattr(pipe, "scheduler", None)
    set_timesteps = getattr(scheduler, "set_timesteps", None)
    if callable(set_timesteps):
        att.scheduler, att.old_set_timesteps = scheduler, scheduler.__dict__.get("set_timesteps")

        def new_run(*args: Any, **kwargs: Any) -> Any:
            state["last"] = None
            return set_timesteps(*args, **kwargs)

        scheduler.set_timesteps = new_run


def _rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, dict):  # PixArt's added_cond_kwargs
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch:
        return value[rows]
    return value


def _sample(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (sample, *out[1:])
    return type(out)(sample=sample)


def _heads(attn: Any, hidden_states: torch.Tensor, batch: int) -> tuple[Any, Any, Any, int]:
    """Queries, keys and values of `hidden_states` as [batch, heads, tokens, head_dim], normed
    as the layer norms them (both diffusers processors start this way)."""
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim
