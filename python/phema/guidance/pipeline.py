"""EMAG as arguments of a diffusers pipeline call, the way diffusers exposes PAG
(``pag_scale``, ``pag_applied_layers``): wrap the pipeline once, then pass ``emag_scale`` and
``emag_applied_layers`` to each call (docs/guidance.md, "diffusers").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phema.guidance.emag import EMAG


class EMAGPipeline:
    """A diffusers pipeline whose calls take EMAG arguments.

    ``EMAGPipeline(pipe)(..., emag_scale=3.0, emag_applied_layers=[12, 13, 14, 15])`` runs the
    call with an :class:`EMAG` attached for that call only (the preset of the pipeline's kind:
    :meth:`EMAG.dit` for DiT, :meth:`EMAG.sd3` for SD3 and others, with `emag_kwargs` given
    here overriding it) and detached afterwards; ``emag_scale=None`` (the default) runs the
    plain pipeline. `cfg` and `cond_first` are passed to :meth:`EMAG.attach` (PixArt needs
    ``cfg=``). Every other attribute is the wrapped pipeline's.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        cfg: bool | None = None,
        cond_first: bool | None = None,
        **emag_kwargs: Any,
    ) -> None:
        if not hasattr(pipe, "transformer"):
            raise TypeError(
                f"EMAGPipeline({type(pipe).__name__}): need a diffusers pipeline with a transformer"
            )
        self.pipe = pipe
        self.cfg = cfg
        self.cond_first = cond_first
        self.emag_kwargs = emag_kwargs

    def make_emag(self, emag_scale: float, emag_applied_layers: Sequence[int] | None) -> EMAG:
        """The EMAG one call uses."""
        preset = EMAG.dit if type(self.pipe).__name__.startswith("DiT") else EMAG.sd3
        kwargs = dict(self.emag_kwargs, emag_scale=emag_scale)
        if emag_applied_layers is not None:
            return preset(list(emag_applied_layers), **kwargs)
        return preset(**kwargs)

    def __call__(
        self,
        *args: Any,
        emag_scale: float | None = None,
        emag_applied_layers: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        if emag_scale is None:
            if emag_applied_layers is not None:
                raise ValueError(
                    f"emag_applied_layers={list(emag_applied_layers)} without emag_scale: "
                    "give emag_scale to guide with EMAG"
                )
            return self.pipe(*args, **kwargs)
        emag = self.make_emag(emag_scale, emag_applied_layers)
        with emag.attach(self.pipe, cfg=self.cfg, cond_first=self.cond_first):
            return self.pipe(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)
