"""Sampling settings and the next-token draw: greedy, temperature, top-k, top-p, repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is continued. Raises ValueError naming the field when a value is out of range.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1 are off. repetition_penalty > 1 discourages
    every token already in the prompt or the output (CTRL, Keskar et al. 2019 §4.1, as Hugging Face's
    RepetitionPenaltyLogitsProcessor: a positive logit is divided by it, a negative one multiplied).
    Generation ends at max_new_tokens, at the end-of-text token unless ignore_eos, or where a stop
    string appears in the output (the output ends before it). seed None draws a fresh one."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 = off)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {expected}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def filter_logits(logits_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k (0 = all) and outside its nucleus: the fewest
    most likely tokens whose probability reaches top_p (Holtzman et al. 2020, "The Curious Case of
    Neural Text Degeneration" §3.1; top-p is taken after top-k, as Hugging Face's warpers do). The most
    likely token always stays. logits_BV fp32; top_k_B long, top_p_B fp32, both [B]."""
    V = logits_BV.shape[-1]
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=logits_BV.device)
    k_B = torch.where(top_k_B > 0, top_k_B.clamp(max=V), V)
    sorted_BV = sorted_BV.masked_fill(rank_V >= k_B[:, None], float("-inf"))
    probs_BV = sorted_BV.softmax(-1)
    mass_before_BV = probs_BV.cumsum(-1) - probs_BV
    drop_BV = (mass_before_BV >= top_p_B[:, None]) | (rank_V >= k_B[:, None])
    drop_BV[:, 0] = False
    return logits_BV.masked_fill(torch.zeros_like(drop_BV).scatter_(1, order_BV, drop_BV), float("-inf"))


def penalize(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty_B: torch.Tensor) -> torch.Tensor:
    """Repetition penalty on the tokens a row has seen (seen_BV bool): logit / p if positive, else logit * p."""
    p = penalty_B[:, None]
    return torch.where(seen_BV, torch.where(logits_BV > 0, logits_BV / p, logits_BV * p), logits_BV)


def sample(logits_BV: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
           seen_BV: Optional[torch.Tensor] = None) -> list[int]:
    """The next token of each row. Each row draws from its own generator only, so a row's tokens do not
    depend on which other rows share its batch. `seen_BV` is needed when a row has a repetition penalty."""
    logits_BV = logits_BV.float()
    device = logits_BV.device
    if any(p.repetition_penalty != 1 for p in params):
        logits_BV = penalize(logits_BV, seen_BV, torch.tensor([p.repetition_penalty for p in params], device=device))
    greedy = [p.temperature == 0 for p in params]
    out = logits_BV.argmax(-1).tolist()
    if all(greedy):
        return out
    temperature_B = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    logits_BV = filter_logits(logits_BV / temperature_B[:, None],
                              torch.tensor([p.top_k for p in params], device=device),
                              torch.tensor([float(p.top_p) for p in params], device=device))
    probs_BV = logits_BV.softmax(-1)
    for b, gen in enumerate(generators):
        if not greedy[b]:
            out[b] = int(torch.multinomial(probs_BV[b], 1, generator=gen))
    return out
