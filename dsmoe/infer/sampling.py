"""Sampling settings and the next-token draw: greedy, temperature, top-k, top-p, logit bias, repetition,
presence and frequency penalties; the model's log-probabilities of the chosen and the most likely tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

MIN_TEMPERATURE = 1e-2  # below it logits / T overflow fp32 (1e-45 gives inf): 0 means greedy, (0, 0.01) is refused
MAX_LOGPROBS = 20  # top log-probabilities reported per token, as vLLM allows
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is continued. Raises ValueError naming the field when a value is out of range.

    temperature 0 is greedy (argmax), else at least MIN_TEMPERATURE. top_k 0 and top_p 1 are off.
    repetition_penalty > 1 discourages every token already in the prompt or the output (CTRL, Keskar et al.
    2019 §4.1, as Hugging Face's RepetitionPenaltyLogitsProcessor: a positive logit is divided by it, a
    negative one multiplied). presence_penalty and frequency_penalty are OpenAI's: every logit loses
    presence x [token generated] + frequency x (times generated), over the output only. logit_bias: (token
    id, bias) pairs added to the logits first. logprobs N: report the model's log-probability of each
    chosen token and its N most likely ones (the raw distribution, before any of the settings above);
    prompt_logprobs: the same for every prompt token after the first. (Log-probabilities are normalised over
    the model's whole embedding, padding rows included, as its training loss is.) Generation ends at max_new_tokens,
    at the end-of-text token unless ignore_eos, or where a stop string appears in the output (the output
    ends before it). seed None draws a fresh one."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        checks = [
            ("max_new_tokens", _int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _number(self.temperature) and (self.temperature == 0 or
                                                           MIN_TEMPERATURE <= self.temperature < float("inf")),
             f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("repetition_penalty", _number(self.repetition_penalty) and 1e-2 <= self.repetition_penalty <= 1e2,
             "a number in [0.01, 100] (1 = off)"),
            ("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2] (0 = off)"),
            ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2] (0 = off)"),
            ("logit_bias", all(_int(t) and t >= 0 and _number(b) and -100 <= b <= 100 for t, b in self.logit_bias),
             "token ids >= 0 mapped to biases in [-100, 100]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("seed", self.seed is None or (_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}] or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {expected}")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < float("inf")


def filter_logits(logits_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k (0 = all) and outside its nucleus: the fewest
    most likely tokens whose probability reaches top_p (Holtzman et al. 2020, "The Curious Case of
    Neural Text Degeneration" §3.1; top-p is taken after top-k, as Hugging Face's warpers do). The most
    likely token always stays. logits_BV fp32; top_k_B long, top_p_B float64, both [B].

    The mass before each token is an exclusive running sum in float64, so a token whose predecessors
    reach top_p exactly is dropped (a sum minus the token's own probability, in fp32, rounds either way)."""
    V = logits_BV.shape[-1]
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=logits_BV.device)
    k_B = torch.where(top_k_B > 0, top_k_B.clamp(max=V), V)
    sorted_BV = sorted_BV.masked_fill(rank_V >= k_B[:, None], float("-inf"))
    probs_BV = sorted_BV.double().softmax(-1)
    mass_before_BV = torch.cat([torch.zeros_like(probs_BV[:, :1]), probs_BV.cumsum(-1)[:, :-1]], dim=-1)
    drop_BV = (mass_before_BV >= top_p_B.double()[:, None]) | (rank_V >= k_B[:, None])
    drop_BV[:, 0] = False
    return logits_BV.masked_fill(torch.zeros_like(drop_BV).scatter_(1, order_BV, drop_BV), float("-inf"))


def penalize(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty_B: torch.Tensor) -> torch.Tensor:
    """Repetition penalty on the tokens a row has seen (seen_BV bool): logit / p if positive, else logit * p."""
    p = penalty_B[:, None]
    return torch.where(seen_BV, torch.where(logits_BV > 0, logits_BV / p, logits_BV * p), logits_BV)


def sample(logits_BV: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
           seen_BV: Optional[torch.Tensor] = None, counts_BV: Optional[torch.Tensor] = None) -> list[Optional[int]]:
    """The next token of each row, or None for a row whose adjusted logits are not finite (that row fails
    alone). Each row draws from its own generator only, so a row's tokens do not depend on which other
    rows share its batch. `seen_BV` (bool) is needed when a row has a repetition penalty, `counts_BV`
    (output token counts, float) when it has a presence or frequency penalty."""
    logits_BV = logits_BV.float()
    B, V = logits_BV.shape
    device = logits_BV.device
    if any(p.logit_bias for p in params):
        bias_BV = torch.zeros_like(logits_BV)
        for b, p in enumerate(params):
            for t, v in p.logit_bias:
                if t < V:
                    bias_BV[b, t] = v
        logits_BV = logits_BV + bias_BV
    if any(p.repetition_penalty != 1 for p in params):
        logits_BV = penalize(logits_BV, seen_BV, torch.tensor([p.repetition_penalty for p in params], device=device))
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        presence_B = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency_B = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        logits_BV = logits_BV - presence_B * (counts_BV > 0) - frequency_B * counts_BV
    greedy = [p.temperature == 0 for p in params]
    temperature_B = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    logits_BV = filter_logits(logits_BV / temperature_B[:, None],
                              torch.tensor([min(p.top_k, V) for p in params], device=device),
                              torch.tensor([float(p.top_p) for p in params], dtype=torch.float64, device=device))
    top_B, out_B = logits_BV.max(-1)
    ok = torch.isfinite(top_B).tolist()  # NaN or +inf anywhere shows in the row's max
    out: list[Optional[int]] = [t if good else None for t, good in zip(out_B.tolist(), ok)]
    rows = [b for b in range(B) if ok[b] and not greedy[b]]
    if rows:
        probs_RV = logits_BV[rows].softmax(-1)
        for r, b in enumerate(rows):
            out[b] = int(torch.multinomial(probs_RV[r], 1, generator=generators[b]))
    return out


def token_logprobs(logits_BV: torch.Tensor, chosen_B: torch.Tensor, top_n: int,
                   vocab_limit: Optional[int] = None) -> tuple[list[float], list[dict[int, float]]]:
    """The model's log-probabilities (log-softmax of the raw logits over the whole embedding, padding rows
    included, as training's loss and transformers score them; fp32) of `chosen_B` [B] and of each row's
    `top_n` most likely tokens below `vocab_limit`: ([B] floats, B dicts token id -> log-probability)."""
    logp_BV = logits_BV.float().log_softmax(-1)
    chosen = logp_BV.gather(-1, chosen_B[:, None])[:, 0].tolist()
    if top_n == 0:
        return chosen, [{} for _ in chosen]
    values, ids = logp_BV[:, :vocab_limit].topk(top_n, dim=-1)
    return chosen, [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
