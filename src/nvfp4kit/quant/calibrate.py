"""Max calibration through our own decoder layer: record max |input| of every linear and expert projection.

The layer runs with full-precision weights (ModelOpt's `max` calibration also runs the unquantized model) and
its ops go through `RecordingBackend`, which notes the input amax of each linear by weight identity. Experts
follow Gemma 4's routing exactly as ModelOpt's fused-experts wrapper sees it: one shared input quantizer for
all experts' gate/up (every routed token) and one for all experts' down (the activations of routed
(token, expert) pairs only); no token is sent to extra experts during calibration.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nvfp4kit.config import Gemma4TextConfig
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.model.layers import attention
from nvfp4kit.model.ops import OpBackend, Weight, gelu_tanh

GATE_UP, DOWN = "gate_up", "down"


def _identity(weight: Weight) -> int:
    if isinstance(weight, NVFP4Tensor):
        raise ValueError("calibration needs full-precision weights, got an NVFP4 weight")
    return weight.data_ptr()


class RecordingBackend:
    """An op backend that forwards `linear` to `inner` and keeps the running max |x| per named weight."""

    name = "recording"

    def __init__(self, inner: OpBackend):
        self.inner = inner
        self.names: dict[int, str] = {}
        self.amax: dict[str, torch.Tensor] = {}

    def watch(self, weight: torch.Tensor, name: str) -> None:
        self.names[_identity(weight)] = name

    def _record(self, name: str, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        amax = x.detach().abs().amax().float().cpu()
        old = self.amax.get(name)
        self.amax[name] = amax if old is None else torch.maximum(old, amax)

    def linear(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        name = self.names.get(_identity(weight))
        if name is not None:
            self._record(name, x)
        return self.inner.linear(x, weight)

    def moe(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up: Weight,
        down: Weight,
    ) -> torch.Tensor:
        """Expert by expert, in fp32 accumulation like the torch backend, noting both projections' inputs."""
        name = self.names.get(_identity(gate_up))
        assert isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in torch.unique(topk_ids).tolist():
            tokens, slot = torch.where(topk_ids == e)
            h = F.linear(x[tokens], gate_up[e].to(x.dtype))
            gate, up = h.chunk(2, dim=-1)
            act = gelu_tanh(gate) * up
            if name is not None:
                self._record(f"{name}:{GATE_UP}", x[tokens])
                self._record(f"{name}:{DOWN}", act)
            y = F.linear(act, down[e].to(x.dtype))
            out.index_add_(0, tokens, y.float() * topk_weights[tokens, slot].float().unsqueeze(-1))
        return out.to(x.dtype)


class CalibrationContext:
    """Attention for a chunk of calibration sequences laid end to end ([T] flat tokens, one causal block each).

    Keys/values of layers that later layers reuse (E2B/E4B KV sharing) are kept in `kv_store` per chunk.
    """

    def __init__(
        self,
        cfg: Gemma4TextConfig,
        lengths: list[int],
        *,
        chunk: int,
        kv_store: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ):
        self.cfg = cfg
        self.lengths = lengths
        self.chunk = chunk
        self.kv_store = kv_store
        self.positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        self.reused = {cfg.kv_source_layer(i) for i in range(cfg.num_hidden_layers)} - set(
            range(cfg.first_kv_shared_layer, cfg.num_hidden_layers)
        )

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        window: int | None,
    ) -> torch.Tensor:
        if k is None or v is None:
            k, v = self.kv_store[(self.chunk, self.cfg.kv_source_layer(layer))]
        elif layer in self.reused and self.cfg.num_kv_shared_layers:
            self.kv_store[(self.chunk, layer)] = (k, v)
        outs = []
        start = 0
        for n in self.lengths:
            pos = self.positions[start : start + n]
            sl = slice(start, start + n)
            outs.append(attention(q[sl], k[sl], v[sl], q_positions=pos, k_positions=pos, window=window))
            start += n
        return torch.cat(outs)


def chunk_samples(lengths: list[int], *, max_tokens: int) -> Iterator[tuple[int, int]]:
    """Split consecutive samples into (first, end) index ranges of at most `max_tokens` tokens (>= 1 sample)."""
    first, total = 0, 0
    for i, n in enumerate(lengths):
        if i > first and total + n > max_tokens:
            yield first, i
            first, total = i, 0
        total += n
    if first < len(lengths):
        yield first, len(lengths)
