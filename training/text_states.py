"""A frozen text encoder's hidden states for a fixed set of token rows, computed once.

The UNet stages and the InstructPix2Pix stages train against a frozen text encoder and draw the same captions
over and over; encoding each batch again cost about 7% of a UNet step (77 tokens x batch 48 on 2 threads).
"""
from __future__ import annotations

import torch


class FrozenTextStates:
    """Callable like `lambda ids: text_encoder(ids)[0]` for any row of `ids` it was built with."""

    def __init__(self, text_encoder, ids: torch.Tensor, device, batch: int = 256):
        rows = torch.unique(ids.long().cpu(), dim=0)
        with torch.no_grad():
            self.states = torch.cat([text_encoder(rows[i:i + batch].to(device))[0] for i in range(0, len(rows), batch)])
        self._index = {row.numpy().tobytes(): i for i, row in enumerate(rows)}

    def __len__(self) -> int:
        return len(self._index)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            pick = [self._index[row.numpy().tobytes()] for row in ids.long().cpu()]
        except KeyError:
            raise KeyError("a token row the cache was not built with") from None
        return self.states[torch.tensor(pick, device=self.states.device)]
