"""Sampling-time guidance: EMAG, exponential-moving-average guidance (arXiv 2512.17303).

``phema.guidance`` needs torch; diffusers (for :meth:`EMAG.attach`) and scikit-learn (for the
digits demo, ``phema.guidance.digits``) are imported only when used. docs/guidance.md describes
the method, every choice made where the paper left one open, and the API.
"""

from __future__ import annotations

from phema.guidance.compose import APG, CADS, cfg_additive
from phema.guidance.emag import EMAG, Schedule
from phema.guidance.pipeline import EMAGPipeline

__all__ = ["APG", "CADS", "EMAG", "EMAGPipeline", "Schedule", "cfg_additive"]
