"""The sampling contract shared by every engine: what to sample (`SamplingParams`) and the `Engine` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions; hashable so stage caches can key on it."""

    n: int = 1
    temperature: float = 0.8  # 0 = greedy (the n samples are then identical and produced once)
    top_p: float = 0.95
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # completions are cut before the first stop string; that sequence stops
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.stop, str) or any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must be a tuple of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Engine(Protocol):
    """Anything that turns prompts into n raw completions each (text after the prompt, cut at the first stop
    string, EOS removed), in prompt order."""

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, progress: bool = False
    ) -> list[list[str]]: ...


def trivial_completions(prompts: Sequence[str], params: SamplingParams) -> list[list[str]] | None:
    """What every engine answers without running its model (no prompts; no new tokens), else None."""
    if not prompts:
        return []
    if params.max_new_tokens == 0:
        return [[""] * params.n for _ in prompts]
    return None
