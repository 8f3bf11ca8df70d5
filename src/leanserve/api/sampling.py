"""Request fields -> ``SamplingParams``, shared by completions and chat."""

from __future__ import annotations

from leanserve.api.errors import bad_request
from leanserve.api.protocol import SamplingFields
from leanserve.sampling_params import SamplingParams


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    # An empty stop string would match before the first character: it can only mean "no stop".
    return [s for s in items if s]


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token id {token} is outside [0, {vocab_size})", param="logit_bias")
        out[token] = value
    return out


def build_sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int,
    vocab_size: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    choice_index: int = 0,
) -> SamplingParams:
    """One choice's parameters; with a seed, choice ``i`` samples with ``seed + i`` (distinct, reproducible)."""
    top_k = req.top_k or 0
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if top_k < 0 else top_k,  # vLLM's -1 and OpenAI-style 0 both mean "no limit"
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=logit_bias(req.logit_bias, vocab_size),
            seed=None if req.seed is None else req.seed + choice_index,
            stop=stop_strings(req.stop),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=bool(req.ignore_eos),
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens is not False,
            min_tokens=req.min_tokens or 0,
        )
    except ValueError as exc:
        message = str(exc)
        raise bad_request(message, param=message.split(" ", 1)[0]) from exc
