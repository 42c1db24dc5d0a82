"""Fine-tune a Burgers operator checkpoint into a model with new parameters ("TopoFlow").

The new model wraps the operator as ``climax`` and gives the first block's attention a learned
distance bias with two new parameters, ``elevation_alpha`` and ``H_scale``. The base checkpoint
is loaded with ``strict=False``, so PyTorch reports what did not match; this program prints
that report exactly as PyTorch formats it::

    _IncompatibleKeys(missing_keys=['climax.blocks.0.attn.elevation_alpha', ...], unexpected_keys=[])

and then the same keys as a count followed by ``- name`` lines, the form many training scripts
use. A base checkpoint of a different architecture (say --depths 1 1 1 into a 2 2 2 model)
leaves many more keys missing: the case orchd's ``expect.missing_keys`` catches.

If --base does not exist, a base model is pre-trained first (one epoch) and saved there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from workloads.burgers import Attention, Block, BurgersOperator, build_parser, train


class TopoAttention(Attention):
    """Attention with a learned bias -elevation_alpha * H_scale * |i - j| / tokens."""

    def __init__(self, hidden: int, heads: int):
        super().__init__(hidden, heads)
        self.elevation_alpha = nn.Parameter(torch.tensor(0.1))
        self.H_scale = nn.Parameter(torch.ones(heads, 1, 1))

    def bias(self, tokens: int) -> torch.Tensor:
        pos = torch.arange(tokens, device=self.H_scale.device, dtype=self.H_scale.dtype)
        distance = (pos[:, None] - pos[None, :]).abs() / tokens
        return -self.elevation_alpha * self.H_scale * distance


class TopoFlow(nn.Module):
    def __init__(self, tokens: int, patch: int, hidden: int, depths: list[int]):
        super().__init__()
        self.climax = BurgersOperator(tokens, patch, hidden, depths)
        self.climax.blocks[0] = Block(hidden, self.climax.blocks[0].attn.heads, TopoAttention)

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        return self.climax(u0)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/base/latest.pt", help="checkpoint of workloads.burgers")
    parser.add_argument("--base-depths", type=int, nargs="+", default=None,
                        help="depths for pre-training a missing base (default: --depths)")
    parser.set_defaults(epochs=2, lr=1e-3,
                        ckpt_dir=os.path.join(os.environ.get("ORCHD_JOB_DIR", "runs/finetune"), "checkpoints"))
    args = parser.parse_args(argv)
    # OMP_NUM_THREADS when given (jobs sharing a machine: more threads than cores make every one
    # of them spin-wait, 10-100x slower), else up to 4 cores
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(4, os.cpu_count() or 1))))

    base = Path(args.base)
    if not base.exists():
        base_args = parser.parse_args(argv)
        base_args.depths = args.base_depths or args.depths
        base_args.epochs, base_args.lr, base_args.ckpt_dir = 1, 3e-3, str(base.parent)
        print(f"no base checkpoint at {base}: pre-training one (depths={base_args.depths})", flush=True)
        train(BurgersOperator(args.tokens, args.patch, args.hidden, base_args.depths), base_args, "pretrain ")

    model = TopoFlow(args.tokens, args.patch, args.hidden, args.depths)
    state = torch.load(base, map_location="cpu")["model"]
    result = model.load_state_dict({f"climax.{k}": v for k, v in state.items()}, strict=False)
    print(result, flush=True)
    print(f"Missing keys: {len(result.missing_keys)}", flush=True)
    for key in result.missing_keys:
        print(f"  - {key}", flush=True)
    print(f"Unexpected keys: {len(result.unexpected_keys)}", flush=True)
    for key in result.unexpected_keys:
        print(f"  - {key}", flush=True)

    t0 = time.time()
    val_loss = train(model, args)
    print(f"done: final val_loss={val_loss:.5f} in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
