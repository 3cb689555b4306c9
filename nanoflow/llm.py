"""Offline entry point shaped like vLLM's `LLM`: LLM("default").generate(prompts, params)."""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm.auto import tqdm

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import apply_chat_template

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "default", **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

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
        """One output per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        for prompt, p in zip(prompts, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, self.encode(prompt), _copy(p), prompt if isinstance(prompt, str) else None)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant turn."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    st = self.engine.stats
                    bar.set_postfix_str(f"gen {st.generated_tokens / max(st.step_time_s, 1e-9):.0f} tok/s",
                                        refresh=False)
        except BaseException:
            for rid in ids:  # leave the engine clean if the caller interrupts
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[r] for r in ids]


def _copy(p: SamplingParams) -> SamplingParams:
    """The engine's own copy; only finished outputs come back (nothing here reads partial ones)."""
    import dataclasses
    return dataclasses.replace(p, output_kind="final_only")
