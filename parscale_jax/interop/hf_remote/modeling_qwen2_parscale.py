"""PyTorch ParScale model (Qwen2-style decoder with P parallel streams) for Hugging Face transformers 5.x.

This file is copied into exported checkpoint directories and loaded by `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`. It reads the official ParScale checkpoint format unchanged.

The mechanism (Chen et al. 2025, "Parallel Scaling Law for Language Models"): the input is embedded once and fed to
P streams that share every backbone weight; stream p differs only by the learned key/value prefix it prepends to the
attention keys/values of every layer. After the final norm, a small MLP scores the P streams per token, and the output
hidden state is their softmax-weighted sum. P = 1 is exactly a plain Qwen2 model.

Beyond the official code: `qk_norm` normalizes each query and key head before RoPE (as Qwen3; the prefixes are keys as
attention uses them, never normalized or rotated), and `num_experts` > 0 replaces the MLP of every
`decoder_sparse_step`-th layer (layer i when (i + 1) % decoder_sparse_step == 0, as Qwen2-MoE) by a Mixture of Experts
with Qwen2-MoE's routing and tensor names (`mlp.gate`, `mlp.experts.{e}.*_proj`, `mlp.shared_expert*`); the other layers
keep the dense MLP.

Layouts. Hidden states between layers are `[P * B, S, H]` with stream-major rows (row `p * B + b` is stream p of
sequence b). Inside attention the streams are folded into the head axis instead, `[B, P * heads, S, head_dim]`, so the
KV cache keeps the caller's batch as its leading axis: `generate`'s beam search reorders that axis by sequence, which
stream-major cache rows would break. Each `DynamicCache` layer holds `[B, P * n_kv, S_past, head_dim]`, i.e. P times a
plain Qwen2 cache. The T prefix slots per stream are not copied into it: attention reads them from the parameters, so
the cache length is the number of real tokens, as `generate` assumes (resuming from a cache, chunked prefill).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_qwen2_parscale import Qwen2ParScaleConfig

# Additive value for hidden keys. Finite rather than -inf so that a query that sees no key at all (a left-padding
# query when P = 1) gets a uniform softmax instead of NaN, as in the reference implementation.
_HIDDEN = torch.finfo(torch.float32).min


def _rotary_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables `[b, 1, 1, S, head_dim]` (b is B or 1), in the rotate-half convention.

    The two singleton axes broadcast over streams and heads of the `[B, P, heads, S, head_dim]` attention layout.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Qwen2ParScaleRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 so half-precision activations do not lose the statistics.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Qwen2ParScaleMLP(nn.Module):
    def __init__(self, config: Qwen2ParScaleConfig, width: int | None = None) -> None:
        super().__init__()
        width = config.intermediate_size if width is None else width
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen2ParScaleSparseMoeBlock(nn.Module):
    """`num_experts` SwiGLU experts, `num_experts_per_tok` per token, and an optional sigmoid-gated shared expert.

    Routing is in float32: a softmax over all the router's logits, the k largest kept (renormalized to sum to 1 with
    `norm_topk_prob`). Every token is routed (no capacity limit). The P streams are just more tokens.
    """

    def __init__(self, config: Qwen2ParScaleConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Qwen2ParScaleMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts))
        if config.shared_expert_intermediate_size:
            self.shared_expert = Qwen2ParScaleMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        probs = nn.functional.softmax(nn.functional.linear(rows.float(), self.gate.weight.float()), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(rows)
        for index, expert in enumerate(self.experts):
            token, choice = torch.where(chosen == index)
            if token.numel():  # only the tokens routed to this expert
                out.index_add_(0, token, expert(rows[token]) * weights[token, choice, None].to(rows.dtype))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return out.view_as(x)


class Qwen2ParScaleAttention(nn.Module):
    """Grouped-query attention in which each stream attends over its own learned prefix followed by the tokens."""

    def __init__(self, config: Qwen2ParScaleConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_streams = config.parscale_n
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        # Identity modules hold no tensors, so a checkpoint without q/k norms has none.
        self.q_norm = Qwen2ParScaleRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = Qwen2ParScaleRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.n_prefix = config.parscale_n_tokens if self.n_streams > 1 else 0
        if self.n_prefix:
            prefix_shape = (self.n_streams, self.n_kv_heads, config.parscale_n_tokens, self.head_dim)
            self.prefix_k = nn.Parameter(torch.empty(prefix_shape))
            self.prefix_v = nn.Parameter(torch.empty(prefix_shape))

    def _split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """`[P * B, S, n_heads * head_dim]` (stream-major rows) → `[B, P, n_heads, S, head_dim]`."""
        rows, seq_len, _ = x.shape
        x = x.view(self.n_streams, rows // self.n_streams, seq_len, n_heads, self.head_dim)
        return x.permute(1, 0, 3, 2, 4)

    def _folded(self, prefix: torch.Tensor) -> torch.Tensor:
        """`[P, n_kv, T, head_dim]` → `[1, P * n_kv, T, head_dim]`, broadcast over the batch by `matmul`."""
        return prefix.reshape(1, -1, *prefix.shape[2:])

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        past_key_values: DynamicCache | None,
    ) -> torch.Tensor:
        rows, seq_len, _ = hidden_states.shape
        batch = rows // self.n_streams
        groups = self.n_heads // self.n_kv_heads
        cos, sin = rotary
        q = _apply_rotary(self.q_norm(self._split_heads(self.q_proj(hidden_states), self.n_heads)), cos, sin)
        k = _apply_rotary(self.k_norm(self._split_heads(self.k_proj(hidden_states), self.n_kv_heads)), cos, sin)
        v = self._split_heads(self.v_proj(hidden_states), self.n_kv_heads)
        k = k.reshape(batch, self.n_streams * self.n_kv_heads, seq_len, self.head_dim)
        v = v.reshape(batch, self.n_streams * self.n_kv_heads, seq_len, self.head_dim)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        if self.n_prefix:
            # Stream p's keys are [prefix_k[p] ; tokens]. The prefix (no RoPE) is read from the parameters at every
            # call instead of being stored in the cache, so the cache length counts real tokens only, which is what
            # `generate` assumes when it resumes from a cache or crops one.
            k = torch.cat([self._folded(self.prefix_k).expand(batch, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([self._folded(self.prefix_v).expand(batch, -1, -1, -1).to(v.dtype), v], dim=2)
        # Folded head p * n_heads + h uses KV head p * n_kv + h // groups: grouped-query attention on the folded
        # heads lines up. The additive mask is float32 with a finite minimum, so a query that sees no key gets a
        # uniform distribution, as the reference implementation computes.
        q = q.reshape(batch, self.n_streams * self.n_heads, seq_len, self.head_dim)
        bias = attention_mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=self.scaling,
            enable_gqa=groups > 1)

        # [B, P * n_heads, S, head_dim] is [B, P, n_heads, S, head_dim]; back to stream-major rows.
        out = out.view(batch, self.n_streams, self.n_heads, seq_len, self.head_dim).permute(1, 0, 3, 2, 4)
        return self.o_proj(out.reshape(rows, seq_len, self.n_heads * self.head_dim))


class Qwen2ParScaleDecoderLayer(nn.Module):
    def __init__(self, config: Qwen2ParScaleConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = Qwen2ParScaleRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2ParScaleAttention(config, layer_idx)
        self.post_attention_layernorm = Qwen2ParScaleRMSNorm(config.hidden_size, config.rms_norm_eps)
        routed = config.num_experts and (layer_idx + 1) % config.decoder_sparse_step == 0
        self.mlp = Qwen2ParScaleSparseMoeBlock(config) if routed else Qwen2ParScaleMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        past_key_values: DynamicCache | None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, past_key_values)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Qwen2ParScalePreTrainedModel(PreTrainedModel):
    config_class = Qwen2ParScaleConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2ParScaleDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # The base class covers Linear, Embedding and *RMSNorm modules; the prefixes are plain Parameters it does not
        # know about. `nn.init` is looked up at call time so transformers can guard it against overwriting loaded
        # weights.
        super()._init_weights(module)
        if isinstance(module, Qwen2ParScaleAttention) and module.n_prefix:
            nn.init.normal_(module.prefix_k, mean=0.0, std=self.config.initializer_range)
            nn.init.normal_(module.prefix_v, mean=0.0, std=self.config.initializer_range)


class Qwen2ParScaleModel(Qwen2ParScalePreTrainedModel):
    """The backbone: embeddings, decoder layers, final norm and (P > 1) the stream aggregator."""

    def __init__(self, config: Qwen2ParScaleConfig) -> None:
        super().__init__(config)
        self.n_streams = config.parscale_n
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2ParScaleDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2ParScaleRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.n_streams > 1:
            self.aggregate_layer = nn.Sequential(
                nn.Linear(self.n_streams * config.hidden_size, config.hidden_size),
                nn.SiLU(),
                nn.Linear(config.hidden_size, self.n_streams),
            )
        self.post_init()

    def _attention_bias(
        self, attention_mask: torch.Tensor | None, batch: int, seq_len: int, past_len: int, device: torch.device
    ) -> torch.Tensor:
        """Additive float32 mask `[B or 1, 1, S, T + past_len + S]` shared by all streams and heads.

        Prefix columns are always visible; token columns are visible when causal (by cache index, which is what
        "earlier" means even when position ids skip left padding) and not masked out by the 2-D `attention_mask`.
        """
        total = past_len + seq_len
        query_idx = torch.arange(past_len, total, device=device)
        key_idx = torch.arange(total, device=device)
        visible = (key_idx[None, :] <= query_idx[:, None])[None]
        if attention_mask is not None:
            if attention_mask.shape != (batch, total):
                raise ValueError(
                    f"attention_mask must be 2-D [batch, past + new tokens] = {(batch, total)}, "
                    f"got {tuple(attention_mask.shape)}."
                )
            visible = visible & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
        if self.n_streams > 1:
            prefix = visible.new_ones(visible.shape[0], seq_len, self.config.parscale_n_tokens)
            visible = torch.cat([prefix, visible], dim=-1)
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill(~visible, _HIDDEN)
        return bias[:, None]

    def _aggregate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Softmax-weighted sum of the P normalized streams `[P * B, S, H]` → `[B, S, H]`."""
        streams = hidden_states.view(self.n_streams, -1, *hidden_states.shape[1:])
        # The checkpoint format interleaves the streams feature-wise: aggregator input feature h * P + p is feature h
        # of stream p. Moving the stream axis last and flattening gives exactly that order.
        features = streams.permute(1, 2, 3, 0).flatten(-2)
        weights = nn.functional.softmax(self.aggregate_layer(features).float(), dim=-1)
        smooth = self.config.parscale_attn_smooth
        weights = weights * (1.0 - smooth) + smooth / self.n_streams
        mixed = torch.einsum("bsp,pbsh->bsh", weights, streams.float())
        return mixed.to(hidden_states.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> BaseModelOutputWithPast:
        """`attention_mask` is the usual 2-D `[B, past + new]` 0/1 padding mask over real tokens; `position_ids`
        default to `past + 0 .. S-1` for every row (pass the ones `generate` derives for left-padded batches)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            past_key_values = None
        elif past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        elif not isinstance(past_key_values, DynamicCache):
            # Static caches return all their preallocated slots, which the attention mask built here does not cover.
            raise TypeError(f"Qwen2ParScale supports only DynamicCache, got {type(past_key_values).__name__}.")

        batch, seq_len, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        rotary = _rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        bias = self._attention_bias(attention_mask, batch, seq_len, past_len, device)

        hidden_states = inputs_embeds.repeat(self.n_streams, 1, 1)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, bias, past_key_values)
        hidden_states = self.norm(hidden_states)
        if self.n_streams > 1:
            hidden_states = self._aggregate(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class Qwen2ParScaleForCausalLM(Qwen2ParScalePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen2ParScaleConfig) -> None:
        super().__init__(config)
        self.model = Qwen2ParScaleModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """`logits_to_keep`: an int n keeps the logits of the last n positions (0 keeps all), a tensor indexes the
        sequence axis; `generate` passes 1 so the prompt's logits are never materialized."""
        if output_attentions or output_hidden_states:
            raise ValueError("Qwen2ParScale does not return attention maps or per-layer hidden states.")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()
