"""Generation: a preallocated KV cache, a jitted prefill and decode step, sampling and stop tokens.

The cache of every layer and stream holds C = T + max_len slots: the stream's T prefix
keys/values, written once when the cache is made, then one slot per token. The prefill writes a
cache stacked over the layers, `[L, P, B, C, K, H]` for keys and for values, which it hands on as
one `[P, B, C, K, H]` array per layer: decoding runs the layers one by one (`lm.scan_layers`). Every
layer's cache is sharded like the activations (streams over `stream`, rows over `data`, kv heads
over `model`).

Batches are left-padded: every row's last prompt token sits in the same slot, so one decode step
serves the whole batch. Padding slots are hidden from every query and real tokens are numbered from
0 in each row, so a padded row generates exactly what the same prompt does alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parscale_jax.config import ModelConfig, SamplingConfig
from parscale_jax.data.tokenizer import Tokenizer, load_tokenizer
from parscale_jax.errors import ConfigError
from parscale_jax.evaluate import target_log_probs
from parscale_jax.layout import LAYER_CACHE_AXES, Layout
from parscale_jax.model import KVCache, model_graphdef, prefix_slots
from parscale_jax.runs import Run


def sample(logits_BV: jax.Array, key: jax.Array, s: SamplingConfig) -> jax.Array:
    """Next tokens `[B]` from last-position logits: greedy, or temperature / top-k / top-p sampling."""
    logits_BV = logits_BV.astype(jnp.float32)
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / s.temperature
    if s.top_k > 0:
        kth_BV = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
    if s.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # The smallest prefix of the sorted tokens whose mass reaches top_p (the first token always).
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(before_BV < s.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class Generator:
    """Compiled prefill and decode steps for one model, batch size and length budget."""

    def __init__(self, graphdef: nnx.GraphDef, cfg: ModelConfig, layout: Layout, batch: int, max_len: int,
                 sampling: SamplingConfig, score_prompt: bool = False):
        """`score_prompt`: the prefill also gives log p(each prompt token | the ones before it), `[B, S - 1]`
        (0 at padding): what an ensemble's posterior weights start from (ensemble.py)."""
        self.graphdef, self.cfg, self.batch, self.max_len, self.sampling = graphdef, cfg, batch, max_len, sampling
        self.score_prompt = score_prompt
        # Decoding runs the layers as a loop over per-layer copies of the weights and a per-layer cache
        # (see `lm.scan_layers`); the prefill scans the stacked ones and hands the cache over per layer.
        per_layer = layout.sharding(LAYER_CACHE_AXES)
        cache_shardings = KVCache((per_layer,) * cfg.num_layers, (per_layer,) * cfg.num_layers, layout.replicated())

        def prefill(params, tokens_BS, positions_BS, visible_BSC, key):
            model = nnx.merge(graphdef, nnx.State(params))
            logits_BSV, cache = model.decode(tokens_BS, positions_BS, model.init_cache(batch, max_len), visible_BSC)
            cache = KVCache(tuple(cache.k), tuple(cache.v), cache.index)
            scores_BS = ()
            if score_prompt:
                scores_BS = target_log_probs(logits_BSV[:, :-1].astype(jnp.float32), tokens_BS[:, 1:])[0]
                T, S = prefix_slots(cfg), tokens_BS.shape[1]
                real_BS = jnp.diagonal(visible_BSC[:, :, T:T + S], axis1=1, axis2=2)  # a token sees itself
                scores_BS = jnp.where(real_BS[:, :-1], scores_BS, 0.0)
            return sample(logits_BSV[:, -1], key, sampling), logits_BSV[:, -1], cache, scores_BS

        def decode(params, layers, cache, token_B, position_B, visible_BC, key):
            model = nnx.merge(graphdef, nnx.State(params))
            logits_B1V, cache = model.decode(token_B[:, None], position_B[:, None], cache, visible_BC[:, None],
                                             layers)
            return sample(logits_B1V[:, 0], key, sampling), logits_B1V[:, 0], cache

        replicated = layout.replicated()
        self._prefill = jax.jit(prefill, out_shardings=(replicated, replicated, cache_shardings, replicated))
        self._decode = jax.jit(decode, donate_argnums=2, out_shardings=(replicated, replicated, cache_shardings))
        self._unstack = jax.jit(lambda params: nnx.merge(graphdef, nnx.State(params)).unstack_layers())
        self._unstacked: tuple[dict, tuple] | None = None  # (params, their per-layer copies)

    def decode_memory_bytes(self, params: dict) -> int:
        """Device memory of one decode step as compiled: parameters, cache, inputs, outputs and
        temporaries, less what the donated cache lets the outputs reuse."""
        B, C = self.batch, prefix_slots(self.cfg) + self.max_len
        stacked = jax.eval_shape(lambda p: nnx.merge(self.graphdef, nnx.State(p)).init_cache(B, self.max_len), params)
        layer_k = jax.ShapeDtypeStruct(stacked.k.shape[1:], stacked.k.dtype)
        layer_v = jax.ShapeDtypeStruct(stacked.v.shape[1:], stacked.v.dtype)
        cache = KVCache((layer_k,) * self.cfg.num_layers, (layer_v,) * self.cfg.num_layers, stacked.index)
        layers = jax.eval_shape(self._unstack, params)
        token_B = jax.ShapeDtypeStruct((B,), jnp.int32)
        visible_BC = jax.ShapeDtypeStruct((B, C), jnp.bool_)
        compiled = self._decode.lower(params, layers, cache, token_B, token_B, visible_BC, jax.random.key(0)).compile()
        memory = compiled.memory_analysis()
        # The weights count once: the per-layer copies are arguments, and the stacked layers, which
        # the step does not read, are dropped from the compiled program (`jax.jit` keeps no unused
        # argument), as a serving process need not keep them.
        return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                   + memory.temp_size_in_bytes)

    def _layers_of(self, params: dict) -> tuple:
        """The per-layer copies of `params`' weights, made once for the parameters a generator runs with."""
        if self._unstacked is None or self._unstacked[0] is not params:
            self._unstacked = (params, self._unstack(params))
        return self._unstacked[1]

    def start(self, params: dict, prompts: Sequence[Sequence[int]], pad_to: int = 0) -> Decoding:
        """`prompts` left-padded (to at least `pad_to` tokens: fewer prefill shapes to compile), for this
        generator to continue with `params`, one `advance` at a time."""
        return Decoding(self, params, prompts, pad_to)

    def run(self, params: dict, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int] = (),
            on_tokens: Callable[[np.ndarray], None] | None = None,
            keep_logits: bool = False) -> tuple[list[list[int]], np.ndarray | None]:
        """(generated tokens per prompt, without the prompt and ending at a stop token if one came;
        with `keep_logits`, the last-position logits of every step `[steps, B, V]`, else None: only
        the tokens come to the host each step). `on_tokens` gets each step's tokens."""
        decoding = self.start(params, prompts)
        return decode_loop(decoding.advance, decoding.new_tokens, self.sampling.seed, stop_ids, on_tokens,
                           keep_logits)


class Decoding:
    """One batch of prompts being continued by one model: the prompts left-padded, the model's cache,
    and how many tokens have gone into it. `advance` is one step: the prefill, then a decode step for
    every token handed back (the one the model sampled, or another's: an ensemble's, ensemble.py)."""

    def __init__(self, generator: Generator, params: dict, prompts: Sequence[Sequence[int]], pad_to: int = 0):
        B, T, budget = len(prompts), prefix_slots(generator.cfg), generator.max_len
        if B != generator.batch:
            raise ValueError(f"this generator was built for {generator.batch} prompts, got {B}")
        S = max(pad_to, *(len(p) for p in prompts))
        if S == 0 or min(len(p) for p in prompts) == 0:
            raise ConfigError("--prompt", "every prompt needs at least one token")
        self.new_tokens = min(generator.sampling.max_new_tokens, budget - S)
        if self.new_tokens < 1:
            raise ConfigError("--max-new-tokens", f"prompts of {S} tokens leave no room in {budget} positions")

        # Left padding: row b's prompt ends at column S - 1. `real_BC` marks the cache slots holding
        # real keys: the prefix, the row's own prompt tokens, and every slot generation will fill.
        self.tokens_BS = np.zeros((B, S), np.int32)
        real_BS = np.zeros((B, S), bool)
        for b, prompt in enumerate(prompts):
            self.tokens_BS[b, S - len(prompt):] = prompt
            real_BS[b, S - len(prompt):] = True
        self.positions_BS = np.maximum(np.cumsum(real_BS, axis=1) - 1, 0).astype(np.int32)
        self.real_BC = np.concatenate([np.ones((B, T), bool), real_BS, np.ones((B, budget - S), bool)], axis=1)
        self.slots_C = np.arange(T + budget)
        self.position_B = real_BS.sum(axis=1).astype(np.int32)  # the first generated token's position
        self.generator, self.params, self.first_slot = generator, params, T + S
        self.cache: KVCache | None = None
        self.fed = 0  # tokens decoded after the prompt
        self.prompt_log_probs: jax.Array | None = None  # `[B, S - 1]` with the generator's `score_prompt`

    def advance(self, token_B: np.ndarray | None, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the next tokens `[B]` as this model samples them, the logits they come from `[B, V]`): from
        the prompts (the prefill) when `token_B` is None, else with `token_B` fed in."""
        g = self.generator
        if token_B is None:
            S = self.tokens_BS.shape[1]
            visible_BSC = self.real_BC[:, None, :] & (self.slots_C[None, None, :]
                                                      <= self.first_slot - S + np.arange(S)[None, :, None])
            token_B, logits_BV, self.cache, scores_BS = g._prefill(self.params, self.tokens_BS, self.positions_BS,
                                                                  visible_BSC, key)
            self.prompt_log_probs = scores_BS if g.score_prompt else None
            return token_B, logits_BV
        index = self.first_slot + self.fed  # the slot this token goes to (`cache.index` on the device)
        visible_BC = self.real_BC & (self.slots_C[None, :] <= index)
        token_B, logits_BV, self.cache = g._decode(self.params, g._layers_of(self.params), self.cache, token_B,
                                                   self.position_B + self.fed, visible_BC, key)
        self.fed += 1
        return token_B, logits_BV


Advance = Callable[[np.ndarray | None, jax.Array], tuple[jax.Array, jax.Array]]


def decode_loop(advance: Advance, new_tokens: int, seed: int, stop_ids: Sequence[int] = (),
                on_tokens: Callable[[np.ndarray], None] | None = None,
                keep_logits: bool = False) -> tuple[list[list[int]], np.ndarray | None]:
    """Up to `new_tokens` tokens per row from `advance` (a `Decoding`'s, or an ensemble's over
    several), each step's tokens handed back to it, until every row has met a stop token; what
    `Generator.run` returns. Step k samples with the k-th of `new_tokens` keys split from `seed`."""
    keys = jax.random.split(jax.random.key(seed), new_tokens)
    token_B, logits_BV = advance(None, keys[0])
    steps, logits = [], []
    stops = set(stop_ids)
    stop = np.asarray(list(stops) or [-1])
    for step in range(new_tokens):
        token = np.asarray(token_B)
        if step == 0:
            done_B = np.zeros(len(token), bool)
        steps.append(token)
        if keep_logits:
            logits.append(np.asarray(logits_BV))
        if on_tokens is not None:
            on_tokens(np.where(done_B, -1, token))
        done_B |= np.isin(token, stop)
        if done_B.all() or step == new_tokens - 1:
            break
        token_B, logits_BV = advance(token, keys[step + 1])
    generated = np.stack(steps, axis=1)
    results = []
    for row in generated.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results, np.stack(logits) if keep_logits else None


# ---------------------------------------------------------------------------------------------
# Text in, text out: what `parscale-jax generate` does


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """One `prompt`, or the non-blank lines of `prompts_file`."""
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("--prompt", "give one --prompt TEXT or a --prompts FILE (one prompt per line)")
    if prompts_file is None:
        return [prompt]
    if not Path(prompts_file).is_file():
        raise ConfigError("--prompts", f"file not found: {prompts_file}")
    texts = [line for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConfigError("--prompts", f"{prompts_file} holds no prompt")
    return texts


def encode_prompts(tokenizer: Tokenizer, texts: list[str], sampling: SamplingConfig,
                   limit: int) -> tuple[list[list[int]], int]:
    """(the prompts' tokens, the positions a generator needs for them and their continuations), within
    `limit` (model.max_position_embeddings): refused when a prompt leaves no room, said when the
    continuations must be shorter than asked."""
    prompts = [tokenizer.encode(text).tolist() for text in texts]
    longest = max(map(len, prompts))
    if longest >= limit:
        raise ConfigError("--prompt", f"a prompt of {longest} tokens leaves no room to generate within "
                          f"model.max_position_embeddings={limit}")
    if longest + sampling.max_new_tokens > limit:
        print(f"--max-new-tokens {sampling.max_new_tokens}: after a prompt of {longest} tokens only "
              f"{limit - longest} fit within model.max_position_embeddings={limit}; generating at most those",
              file=sys.stderr, flush=True)
    return prompts, min(limit, longest + sampling.max_new_tokens)


Continue = Callable[[list[list[int]], Sequence[int], Callable[[np.ndarray], None] | None], list[list[int]]]


def show_continuations(run_prompts: Continue, tokenizer: Tokenizer, texts: list[str], prompts: list[list[int]],
                       show: Callable[[str], None]) -> None:
    """Hand `show` each text and its continuation by `run_prompts` (prompts, stop ids, a per-step
    callback -> generated tokens per prompt): one prompt's as it comes, several prompts' whole."""
    stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    if len(prompts) > 1:
        outputs = run_prompts(prompts, stop_ids, None)
        for text, output in zip(texts, outputs):
            show(text + tokenizer.decode([t for t in output if t not in stop_ids]) + "\n" + "-" * 40 + "\n")
        return
    shown, tokens = "", []
    show(texts[0])

    def stream(step_tokens):  # the text so far, less what is already shown (bytes join into characters)
        nonlocal shown
        if step_tokens[0] >= 0 and step_tokens[0] not in stop_ids:
            tokens.append(int(step_tokens[0]))
            text = tokenizer.decode(tokens)
            show(text[len(shown):])
            shown = text

    run_prompts(prompts, stop_ids, stream)
    show("\n")


def generate_text(run: Run, texts: list[str], sampling: SamplingConfig, step: int | None,
                  show: Callable[[str], None]) -> None:
    """Continue every text with the run's model (its newest checkpoint, or `step`'s), handing the
    output to `show` piece by piece: one prompt's continuation as it comes, several prompts' whole."""
    run = run.settled(step, "generate")
    config = run.config
    tokenizer = load_tokenizer(config.data)
    prompts, max_len = encode_prompts(tokenizer, texts, sampling, config.model.max_position_embeddings)
    layout = Layout.create(config)
    with jax.set_mesh(layout.mesh):
        params, _ = run.params(layout, step)
        generator = Generator(model_graphdef(config.model), config.model, layout, len(prompts), max_len, sampling)
        show_continuations(lambda prompts, stop_ids, on_tokens: generator.run(params, prompts, stop_ids,
                                                                              on_tokens)[0],
                           tokenizer, texts, prompts, show)
