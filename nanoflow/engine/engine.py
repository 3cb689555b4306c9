"""The step loop: schedule -> run -> sample -> append, detokenize, stop checks, finish (free KV).

With async scheduling (default) step i+1 is scheduled, prepared and launched while step i runs on the device;
step i's tokens are read back after that (async_exec.py)."""
from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from nanoflow.config import EngineConfig
from nanoflow.engine import logits_process
from nanoflow.engine.async_exec import DeviceClock, DeviceWorker, InFlightStep, run_timed
from nanoflow.engine.kv_tiers import kv_cache_salt, make_kv_tiers
from nanoflow.engine.request import Request
from nanoflow.engine.runner import ModelRunner, kv_cache_blocks
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.engine.stats import StepStats
from nanoflow.engine.structured_output import GrammarCompilerCache
from nanoflow.models.loader import load_config, parse_dtype, resolve_model
from nanoflow.outputs import CompletionOutput, RequestOutput
from nanoflow.profiling import region
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import IncrementalDetokenizer, load_tokenizer


@dataclass
class RequestGroup:
    """One user request; n > 1 fans out into n engine requests that share the prompt."""
    request_id: str
    prompt: str | None
    children: list[Request]
    detoks: list[IncrementalDetokenizer] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.plan == "auto":  # tuning is a command's job, not the constructor's
            raise ValueError('plan="auto": resolve it first (autosearch.search.resolve_auto_plan, as make_engine '
                             'does)')
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        src = resolve_model(config.model)
        self.dtype = parse_dtype(config.dtype)
        self.model_config = load_config(src)
        self.tokenizer = load_tokenizer(src)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        num_blocks = config.num_kv_blocks or kv_cache_blocks(
            self.model_config, self.dtype, config.block_size, config.kv_cache_gb, config.tensor_parallel_size)
        self.tp_workers, tp_group = self._start_tensor_parallel(num_blocks)
        self.runner = ModelRunner(self.config, self.model_config, num_blocks, tp_group)
        if tp_group is not None:
            tp_group.barrier()  # every rank built its shard (a worker that failed to has exited: this raises)
        self.kv_tiers = make_kv_tiers(config, self.runner.kv_caches, self.runner.stream)
        salt = kv_cache_salt(src, self.dtype, config.block_size, config.seed, config.device, self.runner.kv_packed)
        self.scheduler = Scheduler(SchedulerConfig.from_engine_config(config, self.max_model_len, num_blocks, salt),
                                   self.kv_tiers, kv_fence=self._wait_for_steps_of)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.grammars = GrammarCompilerCache(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.groups: dict[str, RequestGroup] = {}
        self._owner: dict[str, RequestGroup] = {}
        self.stats = StepStats()
        self._worker = DeviceWorker(self.runner) if config.async_scheduling else None
        self._in_flight: deque[InFlightStep] = deque()  # launched, tokens not read back yet (async: at most 1)
        self._clock = DeviceClock()

    def _start_tensor_parallel(self, num_blocks: int):
        """(workers, rank 0's group) with tensor_parallel_size > 1, else (None, None)."""
        self._finalizer = None
        if self.config.tensor_parallel_size == 1:
            return None, None
        from nanoflow.distributed.launch import start_tensor_parallel
        workers, group = start_tensor_parallel(self.config, self.model_config, num_blocks)
        if group is None:  # this node (or torchrun rank) only served steps, and rank 0 has shut down
            raise SystemExit(0)
        self._finalizer = weakref.finalize(self, workers.shutdown, group)
        return workers, group

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (also done when the engine is collected or at exit)."""
        if self._worker is not None:
            self._worker.close()
        if self._finalizer is not None:
            self._finalizer()

    # ---- requests in and out ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.groups:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        logits_process.check_vocab(self.model_config.vocab_size, prompt_token_ids, params)
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - len(prompt_token_ids))
        grammar = self.grammars.compile(params.structured_outputs)  # cached; ValueError if it does not compile
        children = []
        for i in range(params.n):
            p = params if params.n == 1 else _child_params(params, i)
            p._grammar = grammar
            p._eos_ids = sorted(self.eos_token_ids)  # banned until min_tokens (sampler)
            children.append(Request(list(prompt_token_ids), p, request_id=f"{request_id}#{i}"))
        for c in children:
            self.scheduler.check_fits(c)
        group = RequestGroup(request_id, prompt, children,
                             [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) for _ in children])
        self.groups[request_id] = group
        for c in children:
            self._owner[c.request_id] = group
            self.scheduler.add(c)

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        for c in group.children if group else []:
            self._wait_for_steps_of(c)  # KV is freed at once: no step in flight may still write it
            for f in self._in_flight:  # finished earlier, release was waiting for that step
                if any(r is c for r in f.free_kv_after):
                    f.free_kv_after = [r for r in f.free_kv_after if r is not c]
                    self.scheduler.free_kv(c)
            if not c.is_finished:
                self.scheduler.finish(c, "abort")
                self.scheduler.free_kv(c)
            self._drop_sampling_state(c)
            self._owner.pop(c.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups or self._in_flight)

    # ---- the loop ----
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read back the oldest step in flight. Async: the step just launched
        stays in flight (its tokens are read by the next call), so an EOS is seen one step late."""
        if self.tp_workers is None:
            return self._step()
        try:
            return self._step()
        except Exception as e:  # a collective failed: name the rank that died or hung
            raise self.tp_workers.failure(e) from e

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        self.stats.schedule_s += time.perf_counter() - t0
        if batch:
            self._in_flight.append(self._launch(batch))
            self.stats.num_steps += 1
            self.stats.prompt_tokens += sum(c.num_tokens for c in batch.prefills)
            self.stats.prefix_hit_tokens = self.scheduler.num_prefix_hit_tokens
            self.stats.tier_hit_tokens = self.scheduler.num_tier_hit_tokens
        keep = 1 if self._worker is not None and batch else 0
        outputs = self._read_back(self._in_flight.popleft()) if len(self._in_flight) > keep else []
        self.stats.step_time_s += time.perf_counter() - t0
        return outputs

    def _launch(self, batch) -> InFlightStep:
        t0 = time.perf_counter()
        with region("nanoflow::prepare inputs"):
            inp = self.runner.prepare(batch)
        for req in inp.sample_reqs:
            req.num_output_placeholders += 1
        self.stats.prepare_s += time.perf_counter() - t0
        if self._worker is not None:
            return self._worker.launch(batch, inp)
        return InFlightStep(batch, inp, done=run_timed(self.runner, inp))

    def _read_back(self, flight: InFlightStep) -> list[RequestOutput]:
        """Append a finished step's tokens, detokenize, check stops; drop tokens of requests finished meanwhile."""
        t0 = time.perf_counter()
        try:
            result, timing = flight.wait()
        except BaseException:  # the step failed: its requests' KV is no longer written, free what waited on it
            for req in flight.free_kv_after:
                self.scheduler.free_kv(req)
                self._drop_sampling_state(req)
            raise
        token_ids = result.token_ids if result is not None else []  # (GPU: waits for the pinned copy)
        if flight.inputs.prompt_lp is not None:  # before the tokens: a request may finish on this step
            flight.inputs.prompt_lp.deliver()
        t1 = time.perf_counter()
        self.stats.wait_s += t1 - t0
        self._clock.account(self.stats, timing)
        touched = {id(g): g for c in flight.batch.chunks if not c.req.is_finished
                   for g in (self._owner[c.req.request_id],)}
        for i, req in enumerate(flight.inputs.sample_reqs):
            req.num_output_placeholders -= 1
            if req.is_finished:  # EOS/stop/abort seen after this step launched: its extra token is discarded
                continue
            self._append_token(req, token_ids[i], result.logprobs[i])
            if result.grammar_done is not None and result.grammar_done[i] and not req.is_finished:
                self._finish(req, "stop", None)  # the grammar is complete (its EOS ignored or banned)
            self.stats.generated_tokens += 1
        for req in flight.free_kv_after:  # the step that still wrote their KV has completed
            self.scheduler.free_kv(req)
            self._drop_sampling_state(req)
        if not self._in_flight and not self.scheduler.has_unfinished():
            self._clock.reset()  # nothing to do: the device idling now is not a scheduling gap
        outputs = [self._make_output(g) for g in touched.values()
                   if g.children[0].params.output_kind == "cumulative" or all(c.is_finished for c in g.children)]
        self.stats.process_s += time.perf_counter() - t1
        return outputs

    def _wait_for_steps_of(self, req: Request) -> None:
        """Block until no step in flight writes `req`'s KV (before its blocks are freed at once)."""
        for f in self._in_flight:
            if f.holds(req):
                f.settle()  # (a failed step raises when it is read back, not here)

    def _append_token(self, req: Request, token: int, logprob: dict | None) -> None:
        group = self._owner[req.request_id]
        detok = group.detoks[group.children.index(req)]
        req.output_token_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        p = req.params
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens and not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(req, "stop", None)
        if n_out >= p.min_tokens and token in p.stop_token_ids:
            return self._finish(req, "stop", token)
        detok.step(token)
        if p.stop_strings and n_out >= p.min_tokens and self._check_stop_strings(req, detok):
            return
        req.text = detok.text
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, "length", None)

    def _check_stop_strings(self, req: Request, detok: IncrementalDetokenizer) -> bool:
        text = detok.text
        for s in req.params.stop_strings:
            idx = text.find(s, max(0, len(req.text) - len(s) + 1))
            if idx >= 0:
                req.text = text[: idx + len(s)] if req.params.include_stop_str_in_output else text[:idx]
                self._finish(req, "stop", s)
                return True
        return False

    def _finish(self, req: Request, reason: str, stop_reason) -> None:
        req.stop_reason = stop_reason
        holder = next((f for f in self._in_flight if f.holds(req)), None)
        self.scheduler.finish(req, reason)
        if holder is None:
            self.scheduler.free_kv(req)
            self._drop_sampling_state(req)
        else:  # async: the step in flight still writes its KV; free it once that step completes
            holder.free_kv_after.append(req)

    def _drop_sampling_state(self, req: Request) -> None:
        """A finished request's seeded generator and grammar matcher."""
        self.runner.sampler.drop_state(req)

    def _make_output(self, group: RequestGroup) -> RequestOutput:
        outs = [CompletionOutput(i, c.text, list(c.output_token_ids), c.finish_reason, c.stop_reason,
                                 list(c.logprobs) if c.params.logprobs is not None else None)
                for i, c in enumerate(group.children)]
        finished = all(c.is_finished for c in group.children)
        if finished:
            self.groups.pop(group.request_id, None)
            for c in group.children:
                self._owner.pop(c.request_id, None)
        first = group.children[0]
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, outs, finished,
                             sum(c.num_preemptions for c in group.children),
                             None if first.params.prompt_logprobs is None else [None, *first.prompt_logprobs])


def _child_params(params: SamplingParams, i: int) -> SamplingParams:
    seed = None if params.seed is None else params.seed + i
    # The prompt's logprobs are the same for every sample: only the first child computes them.
    return replace(params, n=1, seed=seed, prompt_logprobs=params.prompt_logprobs if i == 0 else None)
