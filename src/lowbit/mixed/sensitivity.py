"""How a layer's error reaches the output, measured: replace one Linear's weight by a cheap
quantization of it (the probe), run the model from that layer's block on a few calibration
windows, and take the increase of KL(original || probed) per token. Divided by the probe's
local relative output error it gives the layer's sensitivity: output KL per unit of local error.
"""

from __future__ import annotations

import torch

from lowbit.calibration.capture import BlockInputs, capture_first_block_inputs, run_block
from lowbit.models.arch import Arch, blocks_of, get_module


class OutputProbe:
    """The original model's hidden state entering every block and its final log-probs on `ids`
    [n, seq] (float32), so a change inside block i costs a forward from block i on."""

    def __init__(self, model, arch: Arch, ids: torch.Tensor):
        self.model, self.arch = model, arch
        inputs, self.kwargs = capture_first_block_inputs(model, arch, ids, dtype=torch.float32)
        self.hidden = [inputs.hidden]
        with torch.no_grad():
            for i, block in enumerate(blocks_of(model, arch)):
                self.hidden.append(run_block(block, BlockInputs(self.hidden[-1], self.kwargs[i])))
        self.ref = [self._logprobs(h) for h in self.hidden[-1]]

    @torch.no_grad()
    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        norm = get_module(self.model, self.arch.final_norm)
        head = get_module(self.model, self.arch.head)
        return torch.log_softmax(head(norm(h)).float(), -1)

    @torch.no_grad()
    def kl_from(self, block: int) -> float:
        """Mean per-token KL(original || model as it is now), running from `block` on."""
        blocks = blocks_of(self.model, self.arch)
        hidden = self.hidden[block]
        for i in range(block, len(blocks)):
            hidden = run_block(blocks[i], BlockInputs(hidden, self.kwargs[i]))
        kl = n = 0.0
        for h, ref in zip(hidden, self.ref):
            lp = self._logprobs(h)
            kl += float((ref.exp() * (ref - lp)).sum())
            n += ref.shape[0] * ref.shape[1]
        return kl / n

    @torch.no_grad()
    def kl_with_weight(self, block: int, name: str, weight: torch.Tensor) -> float:
        """The KL with Linear `name` (inside block `block`) holding `weight`; restored after."""
        lin = get_module(self.model, name)
        saved = lin.weight.data.clone()
        try:
            lin.weight.data.copy_(weight.to(lin.weight.dtype))
            return max(self.kl_from(block), 0.0)
        finally:
            lin.weight.data.copy_(saved)
