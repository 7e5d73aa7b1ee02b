"""The PyTorch peer of `parscale-jax bench ... --peer torch`: the same model in our transformers code
(`parscale_jax/interop/hf_remote/`: SDPA attention, the P streams folded into the batch of every matrix
product, as the official ParScale code does), trained with torch's AdamW and decoded with its KV
cache, on as many threads as XLA uses. torch comes with the `test` extra."""

from __future__ import annotations

import os
import time

import numpy as np

from parscale_jax.config import Config, ModelConfig
from parscale_jax.analysis.timing import step_latency_s
from parscale_jax.interop.hf import config_to_hf


def threads() -> int:
    """The cores this process may run on: what XLA's CPU thread pool uses too."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_model(cfg: ModelConfig, seed: int = 0):
    """Our transformers model (`Qwen2ParScaleForCausalLM`) with `cfg`'s shape, randomly initialized, float32."""
    import torch

    from parscale_jax.interop.hf_remote.configuration_qwen2_parscale import Qwen2ParScaleConfig
    from parscale_jax.interop.hf_remote.modeling_qwen2_parscale import Qwen2ParScaleForCausalLM

    torch.set_num_threads(threads())
    torch.manual_seed(seed)
    # Our remote code computes every model we train, at any P (MoE and q/k norms included).
    fields = {key: value for key, value in config_to_hf(cfg, "float32", None, "qwen2_parscale").items()
              if key not in ("architectures", "model_type", "auto_map", "torch_dtype")}
    config = Qwen2ParScaleConfig(**fields)
    return Qwen2ParScaleForCausalLM(config).float()


def train_tokens_per_s(config: Config, steps: int) -> float:
    """Training tokens/s of the peer: AdamW as ours (no decay on norms and biases, the same clipping)."""
    import torch

    model = torch_model(config.model).train()
    t = config.train
    no_decay = [p for name, p in model.named_parameters() if "norm" in name or name.endswith("bias")]
    decay = [p for name, p in model.named_parameters() if not ("norm" in name or name.endswith("bias"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(t.b1, t.b2), eps=1e-8)
    B, S, V = t.batch_size, config.data.seq_len, config.model.vocab_size
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, V, (B, S + 1)))

    def step():
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm up: allocations, lazy initialization
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return B * S * steps / (time.perf_counter() - start)


def decode_latency_s(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """Per-token greedy decode latency of the peer with its KV cache: the median interval between
    consecutive tokens over `repeats` runs, as `bench decode` measures ours (a logits processor,
    called once per token, notes the time)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self, times: list[float]):
            self.times = times

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    model = torch_model(cfg).eval()
    prompt = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)))
    mask = torch.ones_like(prompt)

    def run(times: list[float]) -> None:
        with torch.inference_mode():
            model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([Stamp(times)]))

    run([])  # warm up
    stamps = [[] for _ in range(repeats)]
    for times in stamps:
        run(times)
    return step_latency_s(stamps)
