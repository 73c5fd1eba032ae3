"""Input second moments (X^T X) of a layer's linears during a calibration forward, optionally norm-aware.

GPTQ and output-error scale search minimise sum_t c_t ||dW x_t||^2 and need H = sum_t c_t x_t x_t^T. Plain
calibration uses c_t = 1. Gemma 4 normalises almost every branch right after its last linear (q/k/v norms per
head, post-attention and post-feedforward norms), so what reaches the residual stream is dW x_t / rms(y_t):
an error on a token whose branch output is small is amplified. `norm_aware=True` weights each token by
1 / mean(y_t^2) of the normalised output (q/k/v: averaged over heads; dense MLP: the down projection's output,
for gate/up too; experts: the MoE block's output, times the token's routing weight squared), clipped at 100x
the median so a near-zero output cannot dominate.

Experts: `hessians["<name>.gate_up"]` [E, H, H] and `["<name>.down"]` [E, I, I] sum each expert's routed
tokens, `["<name>.tokens"]` [E] counts them (calib_experts batches the solve over experts). A stage that
needs only the inputs of its first linears can stop the forward there (`stop_after`, StageDone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvfp4kit.model.ops import TorchBackend, gelu_tanh

CLIP = 100.0
CROSS = ":cross"  # suffix of sum c_t x_full_t x_t^T, the asymmetric statistics (calib_asym)


def _token_weights(outputs: torch.Tensor, group: int) -> torch.Tensor:
    """c_t = mean over groups of 1 / mean(y^2) of the group, for outputs [T, N] normalised in groups of `group`."""
    ms = outputs.float().reshape(outputs.shape[0], -1, group).pow(2).mean(-1)
    c = (1.0 / (ms + 1e-12)).mean(-1)
    return c.clamp(max=CLIP * c.median().clamp_min(1e-12))


class StageDone(Exception):
    """Raised once the statistics `HessianBackend.stop_after` names are recorded: the rest of the forward
    would not change them."""


class HessianBackend(TorchBackend):
    """Torch ops that also sum c_t x_t x_t^T of the inputs of watched weights (per expert for MoE), in fp32."""

    name = "hessian"

    def __init__(self, *, norm_aware: bool = False) -> None:
        self.norm_aware = norm_aware
        self.recording = True
        self.hessians: dict[str, torch.Tensor] = {}
        self.normed: dict[int, tuple[str, int]] = {}  # weight -> (name, norm group size)
        self.pair_first: dict[int, tuple[str, int]] = {}  # first weight -> (name, second weight)
        self.pair_second: dict[int, str] = {}
        self.experts: dict[int, str] = {}
        self._pending: dict[int, tuple[str, torch.Tensor]] = {}
        self.stop_after: str | None = None
        self.targets: dict[str, torch.Tensor] = {}  # this chunk's full-precision inputs, by name (asymmetric)
        # loss-aware token weights [all calibration tokens] by name (calib_guided), and this chunk's slice
        self.guide: dict[str, torch.Tensor] = {}
        self.window = slice(None)

    def clear(self) -> None:
        self.hessians = {}
        self.stop_after = None
        self.targets = {}
        for table in (self.normed, self.pair_first, self.pair_second, self.experts, self._pending):
            table.clear()

    def watch_normed(self, weight: torch.Tensor, name: str, *, group: int) -> None:
        """A linear whose output goes through an RMSNorm over groups of `group` channels."""
        self.normed[weight.data_ptr()] = (name, group)

    def watch_pair(
        self, first: torch.Tensor, first_name: str, second: torch.Tensor, second_name: str
    ) -> None:
        """Two linears in sequence (gate/up then down) whose final output is normalised as a whole."""
        self.pair_first[first.data_ptr()] = (first_name, second.data_ptr())
        self.pair_second[second.data_ptr()] = second_name

    def watch_experts(self, gate_up: torch.Tensor, name: str) -> None:
        self.experts[gate_up.data_ptr()] = name

    def _weights(self, name: str, outputs: torch.Tensor, group: int) -> torch.Tensor | None:
        """c_t of the tokens of this chunk: loss-aware when guided, else norm-aware or none."""
        guide = self.guide.get(name)
        if guide is not None:
            return guide[self.window]
        return _token_weights(outputs, group) if self.norm_aware else None

    def _add(self, name: str, x: torch.Tensor, c: torch.Tensor | None) -> None:
        self._accumulate(name, _product(x, c))
        target = self.targets.get(name)
        if target is not None:
            self._accumulate(name + CROSS, _product(target, c, x))

    def _accumulate(self, key: str, product: torch.Tensor) -> None:
        old = self.hessians.get(key)
        self.hessians[key] = product if old is None else old + product

    def linear(self, x, weight):
        y = super().linear(x, weight)
        key = weight.data_ptr() if isinstance(weight, torch.Tensor) else None
        if not self.recording or key is None:
            return y
        if key in self.normed:
            name, group = self.normed[key]
            self._add(name, x, self._weights(name, y, group))
            if name == self.stop_after:
                raise StageDone(name)
        elif key in self.pair_first:
            name, second = self.pair_first[key]
            self._pending[second] = (name, x)
        elif key in self.pair_second:
            first_name, first_x = self._pending.pop(key)
            second_name = self.pair_second[key]
            if first_name in self.guide:  # each linear by its own output's gradient
                self._add(first_name, first_x, self._weights(first_name, y, y.shape[-1]))
                self._add(second_name, x, self._weights(second_name, y, y.shape[-1]))
            else:  # both by the normalised output of the pair
                c = _token_weights(y, y.shape[-1]) if self.norm_aware else None
                self._add(first_name, first_x, c)
                self._add(second_name, x, c)
        return y

    def moe(self, x, topk_ids, topk_weights, gate_up, down):
        name = self.experts.get(gate_up.data_ptr()) if isinstance(gate_up, torch.Tensor) else None
        if name is None or not self.recording:
            return super().moe(x, topk_ids, topk_weights, gate_up, down)
        num_experts, top_k = gate_up.shape[0], topk_ids.shape[1]
        # tokens sorted by expert once (stable: each expert's tokens in order), one host sync for the counts
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        routed = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if not n:
                continue
            pairs = order[start : start + n]
            start += n
            tokens, slot = pairs // top_k, pairs % top_k
            gate, up = F.linear(x[tokens], gate_up[e].to(x.dtype)).chunk(2, dim=-1)
            act = gelu_tanh(gate) * up
            y = F.linear(act, down[e].to(x.dtype))
            route = topk_weights[tokens, slot].float()
            out.index_add_(0, tokens, y.float() * route.unsqueeze(-1))
            routed.append((e, tokens, route, act))
        c_all = self._weights(name, out, out.shape[-1])
        h_gate_up = self._expert_stats(f"{name}.gate_up", num_experts, x.shape[1], x.device)
        h_down = self._expert_stats(f"{name}.down", num_experts, down.shape[-1], x.device)
        full = self.targets.get(name)  # the full-precision stream's expert inputs (asymmetric)
        if full is not None:
            cross_gate_up = self._expert_stats(f"{name}.gate_up{CROSS}", num_experts, x.shape[1], x.device)
            cross_down = self._expert_stats(f"{name}.down{CROSS}", num_experts, down.shape[-1], x.device)
        for e, tokens, route, act in routed:
            c = c_all[tokens] * route.pow(2) if c_all is not None else None
            h_gate_up[e] += _product(x[tokens], c)
            h_down[e] += _product(act, c)
            if full is not None:
                x_full = full[tokens]
                gate, up = F.linear(x_full, gate_up[e].to(x.dtype)).chunk(2, dim=-1)
                cross_gate_up[e] += _product(x_full, c, x[tokens])
                cross_down[e] += _product(gelu_tanh(gate) * up, c, act)
        tokens_seen = self.hessians.setdefault(f"{name}.tokens", torch.zeros_like(counts))
        tokens_seen += counts
        return out.to(x.dtype)

    def _expert_stats(self, key: str, experts: int, k: int, device: torch.device) -> torch.Tensor:
        if key not in self.hessians:
            self.hessians[key] = torch.zeros(experts, k, k, dtype=torch.float32, device=device)
        return self.hessians[key]


def _product(x: torch.Tensor, c: torch.Tensor | None, other: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t c_t x_t other_t^T (other defaults to x); c [T, G] (one weight per output-row group, calib_guided)
    gives G of them [G, K, K']."""
    x = x.float()
    other = x if other is None else other.float()
    if c is not None and c.dim() == 2:
        return torch.stack([(x * c[:, g, None].to(x.device)).T @ other for g in range(c.shape[1])])
    return (x if c is None else x * c[:, None].to(x.device)).T @ other


class CaptureBackend(HessianBackend):
    """Runs the full-precision twin of a layer and keeps, per chunk, the inputs of the watched linears and
    experts by name (no statistics): the targets of the asymmetric statistics."""

    name = "capture"

    def __init__(self) -> None:
        super().__init__(norm_aware=False)
        self.captured: dict[str, torch.Tensor] = {}

    def _add(self, name: str, x: torch.Tensor, c: torch.Tensor | None) -> None:
        self.captured[name] = x

    def moe(self, x, topk_ids, topk_weights, gate_up, down):
        name = self.experts.get(gate_up.data_ptr()) if isinstance(gate_up, torch.Tensor) else None
        if name is not None and self.recording:
            self.captured[name] = x
        return TorchBackend.moe(self, x, topk_ids, topk_weights, gate_up, down)
