"""Offline generation: `LLM(model).generate(prompts, SamplingParams(...))`.

Runs the same `EngineCore` the worker runs (built by the same `build_engine`), on the caller's thread, until every prompt of the
call has finished. Text, hidden stop tokens and stop strings go through the server's `OutputAssembler`, so offline
and served outputs agree. With `tensor_parallel_size > 1` the engine starts a process per extra
rank (spawned, so a script must build the `LLM` under `if __name__ == "__main__":`), and `close()`
(or leaving a `with LLM(...)` block) stops them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from tidal.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig
from tidal.engine.factory import build_engine, load_engine_tokenizer
from tidal.frontend.detokenizer import OutputAssembler
from tidal.protocol import AddRequest, SamplingParams, TokenLogprob


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = ModelConfig.dtype,
                 device: str = ModelConfig.device, max_model_len: int | None = None, seed: int = ModelConfig.seed,
                 block_size: int = CacheConfig.block_size, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int = CacheConfig.kv_cache_memory_bytes,
                 enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
                 token_budget: int = SchedulerConfig.token_budget, max_num_seqs: int = SchedulerConfig.max_num_seqs,
                 enable_chunked_prefill: bool = SchedulerConfig.enable_chunked_prefill,
                 attention_backend: str = RunnerConfig.attention_backend,
                 enable_cuda_graphs: bool = RunnerConfig.enable_cuda_graphs,
                 tensor_parallel_size: int = ParallelConfig.tensor_parallel_size,
                 quantization: str | None = ModelConfig.quantization):
        self.config = EngineConfig(
            model=ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, device=device,
                              max_model_len=max_model_len, seed=seed,
                              quantization=quantization),
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                              kv_cache_memory_bytes=kv_cache_memory_bytes,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(token_budget=token_budget, max_num_seqs=max_num_seqs,
                                      enable_chunked_prefill=enable_chunked_prefill),
            runner=RunnerConfig(attention_backend=attention_backend, enable_cuda_graphs=enable_cuda_graphs),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size))
        self.tokenizer = load_engine_tokenizer(self.config)
        self.engine = build_engine(self.config, tokenizer=self.tokenizer)

    def close(self) -> None:
        """Release the engine (and stop its tensor-parallel processes); the LLM can't generate after."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a token-id list, or a list of token-id lists."""
        prompts = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        outputs: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params_list):
            text = prompt if isinstance(prompt, str) else None
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = uuid.uuid4().hex
            outputs[request_id] = RequestOutput(request_id, text, ids, [CompletionOutput("", [], None)])
            order.append(request_id)
            self.engine.add_request(AddRequest(request_id=request_id, prompt_token_ids=ids, sampling_params=p))
        assemblers = {request_id: self._assembler(outputs[request_id].prompt_token_ids, p)
                      for request_id, p in zip(order, params_list)}
        open_ids = set(order)
        while open_ids:
            for delta in self.engine.step():
                if delta.request_id not in open_ids:
                    continue
                if delta.error:
                    raise ValueError(delta.error)
                out = outputs[delta.request_id]
                completion = out.outputs[0]
                out.num_cached_tokens = delta.num_cached_tokens
                token_ids, stopped = delta.new_token_ids, False
                assembler = assemblers[delta.request_id]
                if assembler is not None:  # the server's detokenizer and stop-string rules
                    piece = assembler.add(token_ids, delta.finished, delta.finish_reason)
                    completion.text += piece.text
                    token_ids, stopped = token_ids[:piece.num_tokens], piece.stopped
                completion.token_ids.extend(token_ids)
                if delta.logprobs:
                    completion.logprobs = (completion.logprobs or []) + list(delta.logprobs[:len(token_ids)])
                if stopped and not delta.finished:
                    self.engine.abort_request(delta.request_id)
                if stopped or delta.finished:
                    completion.finish_reason = "stop" if stopped else delta.finish_reason
                    open_ids.discard(delta.request_id)
        self.engine.step()  # flush abort deltas of stopped requests
        return [outputs[request_id] for request_id in order]

    def _assembler(self, prompt_token_ids: list[int], params: SamplingParams) -> OutputAssembler | None:
        if self.tokenizer is None:  # a dummy model with no tokenizer: token ids only
            return None
        return OutputAssembler(self.tokenizer, prompt_token_ids, stop=params.stop,
                               include_stop_str_in_output=params.include_stop_str_in_output,
                               hidden_token_ids=set(params.stop_token_ids) | self.engine.eos_token_ids)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate([ids], sampling_params)[0]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)
