"""Offline entry point shaped like vLLM's `LLM`: LLM("default").generate(prompts, params)."""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from nanoflow.batch.stream import DEFAULT_LOOKAHEAD, BatchItem, stream_outputs
from nanoflow.config import EngineConfig
from nanoflow.engine.data_parallel import make_engine
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import apply_chat_template

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "default", **kwargs) -> None:
        # data_parallel_size > 1: N engine processes behind LLMEngine's interface (engine/data_parallel.py)
        self.engine = make_engine(EngineConfig(model=model, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy weights): pass token id lists")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or token-id lists. With prefix grouping on
        (the default), requests sharing a prompt prefix are admitted together; the order returned is the input's."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams) and len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        done: list[RequestOutput | None] = [None] * len(prompts)
        # The whole list is the look-ahead window: grouping sees every request, as in BatchLLM.
        for i, out in self.generate_iter(prompts, params, use_tqdm, lookahead=max(1, len(prompts))):
            done[i] = out
        return done

    def generate_iter(self, prompts: Iterable[Prompt],
                      sampling_params: SamplingParams | Iterable[SamplingParams] | None = None,
                      use_tqdm: bool = True, lookahead: int = DEFAULT_LOOKAHEAD) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (input index, output) as requests finish, pulling (and tokenizing) at most `lookahead` prompts
        ahead of admission: a generator of millions of prompts runs in bounded memory. `sampling_params`: one
        for all, or an iterable read alongside the prompts. Closing the iterator aborts what is still running."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_iter = itertools.repeat(params) if isinstance(params, SamplingParams) else iter(params)
        total = len(prompts) if hasattr(prompts, "__len__") else None

        def items() -> Iterator[BatchItem]:
            for i, prompt in enumerate(prompts):
                p = next(params_iter, None)
                if p is None:
                    raise ValueError(f"fewer sampling params than prompts ({i})")
                yield BatchItem(i, self.encode(prompt), p, prompt if isinstance(prompt, str) else None)

        with tqdm(total=total, desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True) as bar:
            yield from stream_outputs(self.engine, items(), lookahead=lookahead, bar=bar)

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant turn."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
