"""Progressive learning (EfficientNetV2 paper, Alg. 1): K stages of equal length in which the
image size and the regularisation (RandAugment magnitude, mixup alpha, dropout) rise linearly
together. As in the official code, stage i uses the fraction (i + 1) / K of the way from the
minimum to the final value, so S (128 -> 300, K = 4) trains at 171, 214, 257, 300 px."""
from __future__ import annotations

from typing import NamedTuple

from train.config import TrainConfig


class ProgressiveStage(NamedTuple):
    """One stage: its steps and the image size and regularisation it trains with."""
    index: int
    first_step: int  # inclusive
    last_step: int  # exclusive
    image_size: int
    randaug: float
    mixup: float
    dropout: float


def _ramp(first: float, last: float, i: int, count: int) -> float:
    return first + (last - first) * (i + 1) / count


def make_stages(config: TrainConfig, total_steps: int, final_size: int) -> list[ProgressiveStage]:
    """The stages of a run of `total_steps` (sizes truncated to int, as the official code)."""
    count = max(1, min(config.num_stages, total_steps))
    stages = []
    for i in range(count):
        stages.append(ProgressiveStage(
                index=i, first_step=total_steps * i // count,
                last_step=total_steps * (i + 1) // count,
                image_size=int(_ramp(config.min_image_size, final_size, i, count)),
                randaug=_ramp(config.min_randaug, config.randaug, i, count),
                mixup=_ramp(config.min_mixup, config.mixup, i, count),
                dropout=_ramp(config.min_dropout, config.dropout, i, count)))
    return stages


def stage_at(stages: list[ProgressiveStage], step: int) -> ProgressiveStage:
    """The stage that trains `step` (the last one for steps past the end)."""
    return next((s for s in stages if step < s.last_step), stages[-1])
