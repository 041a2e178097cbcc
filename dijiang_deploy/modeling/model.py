"""DiJiang causal language models (GPT-NeoX and LLaMA families)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..contract.errors import PositionLimitError, UnsupportedModelError
from .attention import DiJiangAttention, LlamaAttention, NeoXAttention, Recurrence
from .layers import LlamaMLP, NeoXMLP, RMSNorm, RotaryEmbedding

#: Tensors that keep float32 (or better) whatever dtype the model is cast to:
#: decay tables reach 1e28 (fp16 overflows), frequencies and fitted rates
#: lose whole radians / decades in fp16.
KEEP_FP32 = ("D1", "D2", "inv_freq", "log_gamma")


@dataclass
class DiJiangState:
    """Recurrent state of a batch of sequences.

    Attributes:
        layers: one ``[B, H, d, d]`` float32 tensor per layer; ``[b, h, i, j]``
            sums ``phi(k)_i * v_j`` over the tokens seen, decayed.
        position: ``[B]`` int64, tokens consumed so far per row (padding not
            counted); the next real token of row ``b`` sits at ``position[b]``.
    """

    layers: list[torch.Tensor]
    position: torch.Tensor

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, device: torch.device | str = "cpu") -> "DiJiangState":
        shape = (batch, *config.state_shape)
        return cls(
            [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(config.num_layers)],
            torch.zeros(batch, dtype=torch.int64, device=device),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)


@dataclass
class DiJiangOutput:
    """``logits [B, N, V]`` (model dtype) and the state after the last token."""

    logits: torch.Tensor
    state: DiJiangState


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.parallel_residual = config.use_parallel_residual
        if config.family == "gpt_neox":
            self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.attention = NeoXAttention(config)
            self.mlp = NeoXMLP(config)
        else:
            self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
            self.self_attn = LlamaAttention(config)
            self.mlp = LlamaMLP(config)

    @property
    def attn(self) -> DiJiangAttention:
        return self.attention if hasattr(self, "attention") else self.self_attn

    def forward(self, x, cos, sin, positions, mask, state, mode, chunk_size, core=None):
        a, new_state = self.attn(self.input_layernorm(x), cos, sin, positions, mask, state, mode, chunk_size, core)
        if self.parallel_residual:
            return x + a + self.mlp(self.post_attention_layernorm(x)), new_state
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new_state


class _Body(nn.Module):
    """Holds the HF-named submodules (``gpt_neox.*`` or ``model.*``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        emb = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        if config.family == "gpt_neox":
            self.embed_in = emb
            self.layers = layers
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        else:
            self.embed_tokens = emb
            self.layers = layers
            self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    @property
    def embed(self) -> nn.Embedding:
        return self.embed_in if hasattr(self, "embed_in") else self.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.final_layer_norm if hasattr(self, "final_layer_norm") else self.norm


class DiJiangForCausalLM(nn.Module):
    """A DiJiang decoder with its LM head.

    Parameter names follow Hugging Face: ``gpt_neox.*`` + ``embed_out`` for
    GPT-NeoX, ``model.*`` + ``lm_head`` for LLaMA.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.family not in ("gpt_neox", "llama"):
            raise UnsupportedModelError(f"unsupported family {config.family!r}")
        self.config = config
        body = _Body(config)
        head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.family == "gpt_neox":
            self.gpt_neox = body
            self.embed_out = head
        else:
            self.model = body
            self.lm_head = head
        if config.tie_word_embeddings:
            head.weight = body.embed.weight
        self.rotary = RotaryEmbedding(config)

    # -- structure ----------------------------------------------------------

    @property
    def body(self) -> _Body:
        return self.gpt_neox if self.config.family == "gpt_neox" else self.model

    @property
    def head(self) -> nn.Linear:
        return self.embed_out if self.config.family == "gpt_neox" else self.lm_head

    def attention_layers(self) -> list[DiJiangAttention]:
        return [layer.attn for layer in self.body.layers]

    def refresh_decay(self) -> None:
        """Re-fit decay after the tables changed (loading, training)."""
        for attn in self.attention_layers():
            attn.refresh_decay()

    @property
    def position_limit(self) -> int | None:
        """Largest position + 1 any layer accepts; None when unlimited (geometric)."""
        limits = [a.table_length for a in self.attention_layers() if not a.geometric]
        return min(limits) if limits else None

    def new_state(self, batch: int) -> DiJiangState:
        return DiJiangState.zeros(self.config, batch, self.head.weight.device)

    def cast(self, dtype: torch.dtype) -> "DiJiangForCausalLM":
        """Cast weights to ``dtype`` except the tensors in :data:`KEEP_FP32`."""
        for name, module in self.named_modules():
            for pname, param in list(module.named_parameters(recurse=False)):
                if pname not in KEEP_FP32 and param.is_floating_point():
                    param.data = param.data.to(dtype)
            for bname, buf in list(module.named_buffers(recurse=False)):
                if bname not in KEEP_FP32 and buf.is_floating_point():
                    setattr(module, bname, buf.to(dtype))
        return self

    # -- forward ------------------------------------------------------------

    def positions_for(self, input_ids: torch.Tensor, state: DiJiangState, mask: torch.Tensor | None) -> torch.Tensor:
        """Absolute positions ``[B, N]``: padding does not advance a row's count."""
        n = input_ids.shape[1]
        if mask is None:
            return state.position[:, None] + torch.arange(n, device=input_ids.device)[None, :]
        counts = torch.cumsum(mask.to(torch.int64), dim=1)
        return state.position[:, None] + (counts - 1).clamp(min=0)

    def check_positions(self, positions: torch.Tensor, mask: torch.Tensor | None) -> None:
        limit = self.position_limit
        if limit is None:
            return
        real = positions if mask is None else positions.masked_fill(mask == 0, 0)
        if real.numel() and int(real.max()) >= limit:
            raise PositionLimitError(
                f"position {int(real.max())} is past the {limit}-entry decay tables of this checkpoint "
                "(its D1/D2 are not geometric, so they cannot be extended); shorten the input"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        mode: str = "parallel",
        state: DiJiangState | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int = 64,
        core: Recurrence | None = None,
    ) -> DiJiangOutput:
        """Run the model over ``input_ids [B, N]`` (int64) from ``state``.

        Args:
            mode: ``parallel`` (quadratic reference), ``chunked`` (linear time,
                ``chunk_size`` tokens at a time) or ``recurrent`` (token by
                token). All three give the same logits.
            state: the state to continue from; None starts at position 0.
            attention_mask: ``[B, N]``, 0 marks padding. Padding tokens leave
                the state untouched, so left-padded rows start at their first
                real token.

        Returns:
            :class:`DiJiangOutput` with ``logits [B, N, V]`` and the new state.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
        if state is None:
            state = self.new_state(input_ids.shape[0])
        elif state.position.shape[0] != input_ids.shape[0]:
            raise ValueError(f"state is for batch {state.position.shape[0]}, input_ids for {input_ids.shape[0]}")
        self.check_positions(self.positions_for(input_ids, state, attention_mask), attention_mask)
        return self.step(input_ids, state, attention_mask, mode, chunk_size, core)

    def step(
        self,
        input_ids: torch.Tensor,
        state: DiJiangState,
        attention_mask: torch.Tensor | None = None,
        mode: str = "chunked",
        chunk_size: int = 64,
        core: Recurrence | None = None,
        last_logits_only: bool = False,
    ) -> DiJiangOutput:
        """:meth:`forward` without input validation (traced by the exporter).

        ``last_logits_only`` applies the final norm and LM head to the last
        position only, returning ``logits [B, 1, V]``.
        """
        positions = self.positions_for(input_ids, state, attention_mask)
        cos, sin = self.rotary(positions)
        h = self.body.embed(input_ids)
        new_layers = []
        for layer, layer_state in zip(self.body.layers, state.layers):
            h, s = layer(h, cos, sin, positions, attention_mask, layer_state, mode, chunk_size, core)
            new_layers.append(s)
        if last_logits_only:
            h = h[:, -1:]
        logits = self.head(self.body.final_norm(h))
        advanced = input_ids.shape[1] if attention_mask is None else attention_mask.to(torch.int64).sum(1)
        return DiJiangOutput(logits, DiJiangState(new_layers, state.position + advanced))
