"""EMAG: exponential-moving-average guidance at sampling time (arXiv 2512.17303).

Per candidate attention layer l, EMAG keeps an average of the layer's softmax map across the
denoising steps of one sampling run, ``E_l <- beta * E_l + (1 - beta) * A_l``, inside an
accumulation window, and in a third ("negative") forward pass, inside a replacement window,
replaces the map of the layer whose live map deviates most from its average (``mean |E - A|``
over every entry) with ``A~ = lambda * E + (1 - lambda) * A``. The guided prediction is
``eps~' = eps'(x, c) + w_e (eps(x, c) - eps'(x, c))`` (Eq. 14) followed by CFG,
``eps~ = eps(x, 0) + w (eps~' - eps(x, 0))`` (Eq. 15). EMAG-Q averages the attention *queries*
instead of the maps, so every layer keeps fused scaled-dot-product attention.

The presets are the authors' code as they ran it: :meth:`EMAG.dit` (``forward_with_emag``:
the conditional and then the unconditional pass feed the average, ``feed="cond+uncond"``) and
:meth:`EMAG.sd3` (``emag_forward``: the negative pass over both CFG branches feeds it, updating
before replacing, ``feed="negative"``). docs/guidance.md lists every place phema's defaults or
options differ from the reference (each a named option) and the API.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from phema.guidance.processors import attach

Selection = Literal["deviation", "entropy", "fixed"]
_SELECTIONS = ("deviation", "entropy", "fixed")
Reduce = Literal["mean", "head-median"]
_REDUCES = ("mean", "head-median")
Feed = Literal["cond+uncond", "negative", "conditional"]
_FEEDS = ("cond+uncond", "negative", "conditional")
Scaling = Literal["proportional", "k2idx"]
_SCALINGS = ("proportional", "k2idx")


@dataclass(frozen=True)
class Schedule:
    """When EMAG works, in countdown step indices of a run of ``base_steps`` steps (``r = N - 1 - i``
    at loop index ``i``): the negative pass (replacement) runs while ``stop <= r <= start``, the
    average is accumulated while ``accumulate_stop <= r <= accumulate_start`` (None: every step).

    ``scaling`` maps an index ``k`` to a run of ``N`` steps: ``"proportional"`` (phema's choice,
    the default) is ``round(k N / base_steps)``, the identity at ``base_steps`` steps, so both
    presets are the reference's exactly at its own step count; ``"k2idx"`` is the SD3 reference's
    ``round(k (N - 1) / base_steps)`` clamped to ``[0, N - 1]``."""

    start: int = 150
    stop: int = 50
    base_steps: int = 250
    accumulate_start: int | None = None
    accumulate_stop: int | None = None
    scaling: Scaling = "proportional"

    def __post_init__(self) -> None:
        for name in ("start", "stop", "base_steps", "accumulate_start", "accumulate_stop"):
            value = getattr(self, name)
            if value is None and name.startswith("accumulate"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Schedule {name}={value!r}: need an int")
        if self.base_steps < 1:
            raise ValueError(f"Schedule base_steps={self.base_steps}: need at least 1")
        if self.stop < 0:
            raise ValueError(f"Schedule stop={self.stop}: need a step index >= 0")
        if self.start < self.stop:
            raise ValueError(
                f"Schedule start={self.start} < stop={self.stop}: indices count down, so the "
                "replacement window needs start >= stop"
            )
        if self.start > self.base_steps:
            raise ValueError(
                f"Schedule start={self.start}: past the run of base_steps={self.base_steps}"
            )
        if (self.accumulate_start is None) != (self.accumulate_stop is None):
            raise ValueError(
                f"Schedule accumulate_start={self.accumulate_start}, accumulate_stop="
                f"{self.accumulate_stop}: give both (or neither: accumulate at every step)"
            )
        if self.accumulate_start is not None and self.accumulate_stop is not None:
            if not 0 <= self.accumulate_stop <= self.accumulate_start:
                raise ValueError(
                    f"Schedule accumulate_start={self.accumulate_start} < accumulate_stop="
                    f"{self.accumulate_stop}: need 0 <= accumulate_stop <= accumulate_start"
                )
            if self.accumulate_start < self.start:
                raise ValueError(
                    f"Schedule accumulate_start={self.accumulate_start} < start={self.start}: "
                    "the replacement would begin before the average has any step"
                )
        if self.scaling not in _SCALINGS:
            raise ValueError(
                f"Schedule scaling={self.scaling!r}: need one of {', '.join(_SCALINGS)}"
            )

    @classmethod
    def dit(cls) -> Schedule:
        """The DiT reference (``--emag_start_step 150 --emag_time_delta 50``, stop 50, 250 steps):
        accumulate while 50 <= r <= 150, replace while 50 <= r <= 100."""
        return cls(start=100, stop=50, base_steps=250, accumulate_start=150, accumulate_stop=50)

    @classmethod
    def sd3(cls) -> Schedule:
        """The SD3 reference at 28 steps (``k2idx`` of start 250, delta 50, stop 50): accumulate
        while 5 <= r <= 27 (from the first step), replace while 5 <= r <= 22."""
        return cls(start=22, stop=5, base_steps=28, accumulate_start=27, accumulate_stop=5)

    def _scale(self, k: int, num_steps: int) -> int:
        if self.scaling == "k2idx":
            return max(0, min(num_steps - 1, round(k * (num_steps - 1) / self.base_steps)))
        return round(k * num_steps / self.base_steps)

    def window(self, num_steps: int) -> tuple[int, int]:
        """The replacement window (start, stop) in countdown indices of a run of `num_steps`."""
        _check_steps(num_steps)
        return self._scale(self.start, num_steps), self._scale(self.stop, num_steps)

    def accumulation_window(self, num_steps: int) -> tuple[int, int]:
        """The accumulation window (start, stop) in countdown indices of a run of `num_steps`."""
        _check_steps(num_steps)
        if self.accumulate_start is None or self.accumulate_stop is None:
            return num_steps - 1, 0
        return (
            self._scale(self.accumulate_start, num_steps),
            self._scale(self.accumulate_stop, num_steps),
        )

    def active(self, step: int, num_steps: int) -> bool:
        """Whether loop index `step` (0 = first, noisiest step) of `num_steps` runs the negative pass."""
        start, stop = self.window(num_steps)
        return stop <= _countdown(step, num_steps) <= start

    def accumulating(self, step: int, num_steps: int) -> bool:
        """Whether loop index `step` of `num_steps` feeds the average."""
        start, stop = self.accumulation_window(num_steps)
        return stop <= _countdown(step, num_steps) <= start


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: need an int >= 1")


def _countdown(step: int, num_steps: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(f"step={step!r}: need an int in [0, {num_steps})")
    return num_steps - 1 - step


@dataclass
class _Layer:
    avg: torch.Tensor | None = None  # [B, H, Nq, Nk] (maps) or [B, H, Nq, D] (queries)
    score: torch.Tensor | None = None  # [] or [B]: the latest selection score


class EMAG:
    """Exponential-moving-average guidance: keeps per-layer attention averages through one
    sampling run and perturbs one adaptively chosen layer in a negative pass.

    Use it with a diffusers pipeline or transformer (:meth:`attach`), or with your own attention
    code (:meth:`attention`) and sampler (:meth:`begin_step`, :meth:`positive`, :meth:`negative`,
    :meth:`guide`).
    """

    def __init__(
        self,
        candidates: Sequence[int],
        *,
        beta: float = 0.988,
        strength: float = 1.0,
        emag_scale: float = 3.0,
        cfg_scale: float = 1.5,
        schedule: Schedule | None = None,
        selection: Selection = "deviation",
        reduce: Reduce = "mean",
        feed: Feed = "cond+uncond",
        renormalize: bool = False,
        queries: bool = False,
        per_sample: bool = False,
        num_layers: int | None = None,
    ) -> None:
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
            raise TypeError(f"candidates={candidates!r}: need a sequence of layer indices")
        cands = list(candidates)
        if not cands:
            raise ValueError("candidates=[]: need at least one candidate layer")
        for c in cands:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"candidate layer {c!r}: need an int")
            if c < 0:
                raise ValueError(f"candidate layer {c}: need an index >= 0")
        if len(set(cands)) != len(cands):
            raise ValueError(f"candidates={cands}: a layer is listed twice")
        if num_layers is not None:
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
                raise ValueError(f"num_layers={num_layers!r}: need an int >= 1")
            for c in cands:
                if c >= num_layers:
                    raise ValueError(f"candidate layer {c}: the model has {num_layers} layers")
        beta = _float("beta", beta)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta}: need a value in (0, 1)")
        strength = _float("strength", strength)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength}: need a value in [0, 1]")
        emag_scale = _float("emag_scale", emag_scale)
        cfg_scale = _float("cfg_scale", cfg_scale)
        if not (math.isfinite(emag_scale) and math.isfinite(cfg_scale)):
            raise ValueError(f"emag_scale={emag_scale}, cfg_scale={cfg_scale}: need finite values")
        if schedule is None:
            schedule = Schedule.dit()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule={schedule!r}: need a phema.guidance.Schedule")
        if selection not in _SELECTIONS:
            raise ValueError(f"selection={selection!r}: need one of {', '.join(_SELECTIONS)}")
        if reduce not in _REDUCES:
            raise ValueError(f"reduce={reduce!r}: need one of {', '.join(_REDUCES)}")
        if feed not in _FEEDS:
            raise ValueError(f"feed={feed!r}: need one of {', '.join(_FEEDS)}")
        if queries and selection == "entropy":
            raise ValueError(
                "selection='entropy' needs attention maps; EMAG-Q (queries=True) has none"
            )
        self.candidates: tuple[int, ...] = tuple(cands)
        self.beta = beta
        self.strength = strength
        self.emag_scale = emag_scale
        self.cfg_scale = cfg_scale
        self.schedule = schedule
        self.selection: Selection = selection
        self.reduce: Reduce = reduce
        self.feed: Feed = feed
        self.renormalize = bool(renormalize)
        self.queries = bool(queries)
        self.per_sample = bool(per_sample)
        self.num_layers = num_layers
        self._layers = {c: _Layer() for c in cands}
        self._index = {c: i for i, c in enumerate(cands)}
        self._mode: Literal["idle", "record", "perturb"] = "idle"
        self._feeds: tuple[slice, ...] = ()
        self._choice: torch.Tensor | None = None
        self._step: tuple[int, int] | None = None
        self._closed = False
        self._attachment: Any = None
        self.steps_recorded = 0

    # ----------------------------------------------------------------------------- presets

    @classmethod
    def dit(cls, candidates: Sequence[int] = (12, 13, 14, 15), **kwargs: Any) -> EMAG:
        """The DiT-XL/2 reference (``forward_with_emag``): blocks 12-15, w_e = 3 with CFG 1.5, the
        average fed by the conditional then the unconditional pass, the layer with the largest
        mean deviation replaced, :meth:`Schedule.dit`."""
        kwargs.setdefault("emag_scale", 3.0)
        kwargs.setdefault("cfg_scale", 1.5)
        kwargs.setdefault("schedule", Schedule.dit())
        kwargs.setdefault("feed", "cond+uncond")
        return cls(candidates, **kwargs)

    @classmethod
    def sd3(cls, candidates: Sequence[int] = (6, 7, 8), **kwargs: Any) -> EMAG:
        """The SD3-Medium reference (``emag_forward``, combo "No"): blocks 6-8, w_e = 1.5 with
        CFG 7, the average fed by the negative pass over both CFG branches, :meth:`Schedule.sd3`."""
        kwargs.setdefault("emag_scale", 1.5)
        kwargs.setdefault("cfg_scale", 7.0)
        kwargs.setdefault("schedule", Schedule.sd3())
        kwargs.setdefault("feed", "negative")
        return cls(candidates, **kwargs)

    # ----------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the averages: call between sampling runs (attached pipelines do it themselves)."""
        self._check_open()
        for layer in self._layers.values():
            layer.avg = None
            layer.score = None
        self._choice = None
        self._step = None
        self.steps_recorded = 0

    def memory_bytes(self) -> int:
        """Bytes held by the per-layer averages, from their shapes (no device sync)."""
        return sum(
            layer.avg.numel() * layer.avg.element_size()
            for layer in self._layers.values()
            if layer.avg is not None
        )

    def average(self, layer_id: int) -> torch.Tensor | None:
        """The current average of a candidate layer (maps or queries), None before any step."""
        return self._layer(layer_id).avg

    def score(self, layer_id: int) -> torch.Tensor | None:
        """The latest selection score of a candidate layer."""
        return self._layer(layer_id).score

    def active(self, step: int, num_steps: int) -> bool:
        """Whether `step` of `num_steps` runs the negative pass (the schedule; host-side only)."""
        self._check_open()
        return self.schedule.active(step, num_steps)

    def begin_step(self, step: int, num_steps: int) -> bool:
        """Start loop index `step` of a run of `num_steps`: the passes of this step then feed the
        average only inside the schedule's accumulation window. Returns :meth:`active`. Without
        it, every positive pass feeds the average."""
        self._check_open()
        active = self.schedule.active(step, num_steps)
        self._step = (step, num_steps)
        return active

    def _accumulating(self) -> bool:
        return self._step is None or self.schedule.accumulating(*self._step)

    def _positive_records(self) -> bool:
        if not self._accumulating():
            return False
        if self.feed != "negative" or self._step is None:
            return True
        # The negative pass feeds the average on the steps it runs; on the others the positive
        # pass over the same rows computes what it would (no replacement) and feeds it instead.
        return not self.schedule.active(*self._step)

    # ----------------------------------------------------------------------------- passes

    @contextmanager
    def positive(
        self, rows: slice | None = None, uncond_rows: slice | None = None
    ) -> Iterator[EMAG]:
        """The live forward pass of one step. With ``feed="cond+uncond"`` candidate layers update
        their averages from the batch rows `rows` (the conditional branch; None = every row) and
        then from `uncond_rows` (the unconditional branch, when there is one): two updates, as
        the DiT reference's two passes. ``feed="conditional"``: `rows` only. ``feed="negative"``:
        every row, and only on steps without a negative pass."""
        self._check_open()
        for name, value in (("rows", rows), ("uncond_rows", uncond_rows)):
            if value is not None and not isinstance(value, slice):
                raise TypeError(f"{name}={value!r}: need a slice of the batch or None")
        if self._mode != "idle":
            raise ValueError(f"positive(): already inside a {self._mode} pass")
        recording = self._positive_records()
        if recording:
            full = slice(None)
            if self.feed == "negative":
                feeds: tuple[slice, ...] = (full,)
            elif self.feed == "cond+uncond" and uncond_rows is not None:
                feeds = (rows or full, uncond_rows)
            else:
                feeds = (rows or full,)
            self._mode, self._feeds = "record", feeds
        try:
            yield self
        finally:
            self._mode, self._feeds = "idle", ()
        if recording:
            self.steps_recorded += 1

    @contextmanager
    def negative(self) -> Iterator[EMAG]:
        """The negative forward pass: the chosen candidate layer uses the averaged attention
        (its batch must be the rows the average was recorded from); every other layer runs
        normally. With ``feed="negative"`` this pass also feeds the average (before replacing,
        as the SD3 reference) and the choice uses the scores of the previous step."""
        self._check_open()
        if self._mode != "idle":
            raise ValueError(f"negative(): already inside a {self._mode} pass")
        records = self.feed == "negative" and self._accumulating()
        missing = [c for c, layer in self._layers.items() if layer.avg is None]
        if missing and not records:
            raise ValueError(
                f"negative(): candidate layers {missing} have no average yet; run a positive "
                "pass through them first"
            )
        # The choice is fixed before this pass can change any score.
        self._choice = self.choice()
        self._mode = "perturb"
        try:
            yield self
        finally:
            self._mode = "idle"
        if records:
            self.steps_recorded += 1

    def choice(self) -> torch.Tensor:
        """One-hot weights of the layer(s) the negative pass perturbs, on the device:
        shape [candidates] per batch, [candidates, batch] with ``per_sample``."""
        self._check_open()
        layers = [self._layers[c] for c in self.candidates]
        if any(layer.score is None for layer in layers):
            raise ValueError("choice(): no pass has recorded every candidate layer yet")
        scores = torch.stack([layer.score for layer in layers])  # type: ignore[misc]
        if self.selection == "fixed":
            return torch.ones_like(scores)
        idx = scores.argmin(0) if self.selection == "entropy" else scores.argmax(0)
        # A comparison, not F.one_hot (which reads the indices back to check their range).
        slots = torch.arange(len(layers), device=scores.device).view(-1, *([1] * idx.dim()))
        return (slots == idx.unsqueeze(0)).to(scores.dtype)

    # ----------------------------------------------------------------------------- attention

    def attention(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
        query_rows: int | None = None,
    ) -> torch.Tensor:
        """Attention for your own code: ``q, k, v`` are [batch, heads, tokens, head_dim]; returns
        what ``scaled_dot_product_attention`` returns, with EMAG's recording or perturbation when
        inside :meth:`positive` / :meth:`negative` and `layer_id` is a candidate. `query_rows`:
        only the first that many query rows are image rows (joint attention); None = all."""
        self._check_open()
        if isinstance(layer_id, bool) or not isinstance(layer_id, int):
            raise TypeError(f"layer_id={layer_id!r}: need an int")
        if layer_id < 0 or (self.num_layers is not None and layer_id >= self.num_layers):
            raise ValueError(
                f"layer_id={layer_id}: unknown layer"
                + (f" (the model has {self.num_layers})" if self.num_layers is not None else "")
            )
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"attention(): need [batch, heads, tokens, dim] tensors, got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        layer = self._layers.get(layer_id)
        if layer is None or self._mode == "idle":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        nq = q.shape[2] if query_rows is None else query_rows
        if not 0 < nq <= q.shape[2]:
            raise ValueError(f"query_rows={query_rows}: need 1 to {q.shape[2]}")
        if self._mode == "record":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            for rows in self._feeds:
                self._update(layer_id, layer, q, k, attn_mask, scale, nq, rows)
            return out
        if self.feed == "negative" and self._accumulating():
            self._update(layer_id, layer, q, k, attn_mask, scale, nq, slice(None))
        return self._perturb(layer_id, layer, q, k, v, attn_mask, scale, nq)

    def _update(
        self,
        layer_id: int,
        layer: _Layer,
        q: torch.Tensor,
        k: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        nq: int,
        rows: slice,
    ) -> None:
        """One update of a layer's average from batch rows `rows`, and its selection score."""
        with torch.no_grad():
            qr = q[rows, :, :nq]
            if qr.shape[0] == 0:
                raise ValueError(f"rows={rows}: selects no batch row")
            if self.queries:
                live = qr.detach().to(_acc_dtype(q))
            else:
                live = _attention_map(qr, k[rows], _rows_of(attn_mask, rows, q.shape[0]), scale)
            if layer.avg is None:
                layer.avg = live.clone()
                dev = torch.zeros_like(live)
            else:
                if layer.avg.shape != live.shape:
                    raise ValueError(
                        f"layer {layer_id}: the average has shape {tuple(layer.avg.shape)} but "
                        f"this step gives {tuple(live.shape)}; call reset() between sampling runs "
                        "and keep the recorded rows the same through a run"
                    )
                dev = torch.sub(layer.avg, live).abs_()
                layer.avg.lerp_(live, 1.0 - self.beta)
            if self.selection == "entropy":
                layer.score = self._entropy(live)
            else:
                layer.score = self._deviation(dev)

    def _deviation(self, dev: torch.Tensor) -> torch.Tensor:
        """``reduce="mean"``: one mean over every entry (the reference's MAE); per row with
        ``per_sample``. ``"head-median"``: the mean per head, then the median over heads."""
        if self.reduce == "mean":
            return dev.mean(dim=(1, 2, 3)) if self.per_sample else dev.mean()
        per_head = dev.mean(dim=(2, 3))  # [B, H]
        if self.per_sample:
            return per_head.median(dim=1).values
        return per_head.mean(dim=0).median()

    def _entropy(self, live: torch.Tensor) -> torch.Tensor:
        """Mean row entropy per batch row (over heads and queries), then the median over the
        batch (the reference's mode 1); per row with ``per_sample``."""
        rows = -(live * torch.log(live.clamp_min(1e-12))).sum(-1)  # [B, H, Nq]
        per_row = rows.mean(dim=(1, 2))
        return per_row if self.per_sample else per_row.median()

    def _mask(self, layer_id: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        assert self._choice is not None
        w = self._choice[self._index[layer_id]] * self.strength
        if self.per_sample:
            if w.shape[0] != batch:
                raise ValueError(
                    f"layer {layer_id}: the negative pass has {batch} rows but the scores "
                    f"were recorded for {w.shape[0]}"
                )
            w = w.view(batch, 1, 1, 1)
        return w.to(device=like.device, dtype=like.dtype)

    def _perturb(
        self,
        layer_id: int,
        layer: _Layer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        nq: int,
    ) -> torch.Tensor:
        avg = layer.avg
        assert avg is not None
        if avg.shape[0] != q.shape[0] or avg.shape[1] != q.shape[1] or avg.shape[2] != nq:
            raise ValueError(
                f"layer {layer_id}: the negative pass has batch, heads, query rows "
                f"{q.shape[0]}, {q.shape[1]}, {nq} but the average was recorded for "
                f"{avg.shape[0]}, {avg.shape[1]}, {avg.shape[2]}"
            )
        if self.queries:
            w = self._mask(layer_id, q.shape[0], q)
            qi = q[:, :, :nq]
            qi = qi + w * (avg.to(q.dtype) - qi)
            q = qi if nq == q.shape[2] else torch.cat([qi, q[:, :, nq:]], dim=2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        if avg.shape[3] != k.shape[2]:
            raise ValueError(
                f"layer {layer_id}: {k.shape[2]} keys but the averaged map has {avg.shape[3]}"
            )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        e = avg / avg.sum(dim=-1, keepdim=True) if self.renormalize else avg
        replaced = torch.matmul(e.to(v.dtype), v)  # [B, H, nq, D]
        w = self._mask(layer_id, q.shape[0], out)
        oi = out[:, :, :nq]
        oi = oi + w * (replaced - oi)
        return oi if nq == out.shape[2] else torch.cat([oi, out[:, :, nq:]], dim=2)

    # ----------------------------------------------------------------------------- guidance

    def guide(
        self,
        eps_uncond: torch.Tensor | None,
        eps_cond: torch.Tensor,
        eps_neg: torch.Tensor | None,
        *,
        cfg_scale: float | None = None,
        emag_scale: float | None = None,
    ) -> torch.Tensor:
        """Combine the predictions: ``eps~' = eps' + w_e (eps_cond - eps')`` then
        ``eps_uncond + w (eps~' - eps_uncond)``. ``eps_neg=None``: no negative pass this step
        (plain CFG); ``eps_uncond=None``: EMAG-only guidance (no unconditional pass)."""
        w_e = self.emag_scale if emag_scale is None else _float("emag_scale", emag_scale)
        w = self.cfg_scale if cfg_scale is None else _float("cfg_scale", cfg_scale)
        for name, t in (("eps_uncond", eps_uncond), ("eps_neg", eps_neg)):
            if t is not None and t.shape != eps_cond.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, eps_cond {tuple(eps_cond.shape)}"
                )
        guided = eps_cond if eps_neg is None else eps_cond + (w_e - 1.0) * (eps_cond - eps_neg)
        if eps_uncond is None:
            return guided
        return eps_uncond + w * (guided - eps_uncond)

    # ----------------------------------------------------------------------------- diffusers

    def attach(
        self, target: Any, *, cfg: bool | None = None, cond_first: bool | None = None
    ) -> EMAG:
        """Attach to a diffusers pipeline (DiTPipeline, StableDiffusion3Pipeline: the transformer
        then runs the negative pass and guidance itself) or to a transformer model (processors
        only; drive it with :meth:`positive` / :meth:`negative`). Returns self; :meth:`detach`
        or a ``with`` block restores the original processors."""
        self._check_open()
        if self._attachment is not None:
            raise ValueError("attach(): this EMAG is already attached; detach() it first")
        self._attachment = attach(self, target, cfg=cfg, cond_first=cond_first)
        return self

    def detach(self) -> None:
        """Restore the original attention processors (and transformer forward) and close this
        object: it cannot be used afterwards."""
        self._check_open()
        if self._attachment is not None:
            self._attachment.restore()
            self._attachment = None
        self.reset()  # the averages are freed
        self._closed = True

    def __enter__(self) -> EMAG:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.detach()

    # ----------------------------------------------------------------------------- helpers

    def _layer(self, layer_id: int) -> _Layer:
        self._check_open()
        if layer_id not in self._layers:
            raise ValueError(f"layer {layer_id!r}: not a candidate layer {list(self.candidates)}")
        return self._layers[layer_id]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this EMAG was detached; create a new one")

    def __repr__(self) -> str:
        return (
            f"EMAG(candidates={list(self.candidates)}, beta={self.beta}, strength={self.strength}, "
            f"emag_scale={self.emag_scale}, cfg_scale={self.cfg_scale}, schedule={self.schedule}, "
            f"selection={self.selection!r}, reduce={self.reduce!r}, feed={self.feed!r}, "
            f"renormalize={self.renormalize}, queries={self.queries}, per_sample={self.per_sample})"
        )


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: need a number")
    return float(value)


def _rows_of(mask: torch.Tensor | None, rows: slice, batch: int) -> torch.Tensor | None:
    if mask is None or mask.dim() < 3 or mask.shape[0] != batch:
        return mask
    return mask[rows]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Averages are fp32 whatever the model's dtype (fp64 for fp64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attention_map(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) in fp32 (fp64 for fp64 inputs): the map the fused kernel
    never materializes."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = _acc_dtype(q)
    scores = torch.matmul(q.detach().to(dtype), k.detach().to(dtype).transpose(-2, -1))
    scores = scores * s
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask[..., : scores.shape[-2], :], float("-inf"))
        else:
            scores = scores + attn_mask[..., : scores.shape[-2], :].to(dtype)
    return torch.softmax(scores, dim=-1)
