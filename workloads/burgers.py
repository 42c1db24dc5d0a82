"""A small neural operator for the 1-D viscous Burgers' equation.

    u_t + u u_x = nu u_xx   on the periodic interval [0, 1)

The training data are generated here by a pseudo-spectral solver (no download): random
band-limited initial conditions u0 are integrated to time T, and the operator learns the map
u0 -> u(T). The model is a patch transformer ("tokens" patches of the grid, blocks grouped in
stages by --depths).

It prints the lines orchd reads, one per evaluation::

    step 25/270 epoch 1 train_loss=0.41230 val_loss=0.36012 nrmse=0.5812

saves a checkpoint at each evaluation into --ckpt-dir and resumes from the latest one on
restart, so a retried attempt continues where the previous one stopped. Runs on CPU in well
under a minute at the default size and on a GPU when one is visible.

Data-parallel when launched as several tasks (``srun``, ``torchrun``): with ``WORLD_SIZE`` > 1
it joins a torch.distributed group (``env://``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE;
gloo on CPU, nccl on GPUs), wraps the model in DistributedDataParallel, each rank trains on its
share of every batch, and rank 0 alone prints and checkpoints.

Faults on demand, for orchd's retry rules, on attempt K (``--crash-on-attempt``, matched against
``$ORCHD_ATTEMPT``): ``--crash-at-step N`` SIGKILLs the process at step N (exit status 137, as
the kernel's OOM killer would); ``--nccl-error-at-step N`` prints a NCCL error line and hangs,
as a broken collective does.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

# ----------------------------------------------------------------------------- data


def solve_burgers(u0: torch.Tensor, nu: float, t_end: float, dt: float) -> torch.Tensor:
    """Integrate Burgers' equation pseudo-spectrally from ``u0`` (batch, n) to ``t_end``.

    Viscosity is treated exactly with an integrating factor, the nonlinear term u u_x =
    (u^2/2)_x with classical RK4 and 2/3-rule de-aliasing. Returns a tensor shaped like u0.
    """
    n = u0.shape[-1]
    k = torch.fft.rfftfreq(n, d=1.0 / n, dtype=u0.dtype) * 2 * math.pi  # wavenumbers on [0,1)
    dealias = (torch.arange(k.numel()) < (n // 3)).to(u0.dtype)
    decay = torch.exp(-nu * k**2 * dt / 2)  # integrating factor over half a step

    def nonlinear(v_hat: torch.Tensor) -> torch.Tensor:
        u = torch.fft.irfft(v_hat, n=n)
        return -0.5j * k * torch.fft.rfft(u * u) * dealias

    v = torch.fft.rfft(u0)
    for _ in range(int(round(t_end / dt))):
        a = dt * nonlinear(v)
        b = dt * nonlinear(decay * (v + a / 2))
        c = dt * nonlinear(decay * v + b / 2)
        d = dt * nonlinear(decay**2 * v + decay * c)
        v = decay**2 * (v + a / 6) + decay * (b + c) / 3 + d / 6
    return torch.fft.irfft(v, n=n)


def make_dataset(samples: int, grid: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random initial conditions (samples, grid) and their solutions at T = 0.3, nu = 0.02."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(grid, dtype=torch.float64) / grid
    modes = torch.arange(1, 6, dtype=torch.float64)
    amp = torch.randn(samples, 5, generator=gen, dtype=torch.float64) / modes
    phase = torch.rand(samples, 5, generator=gen, dtype=torch.float64) * 2 * math.pi
    u0 = (amp[:, :, None] * torch.sin(2 * math.pi * modes[None, :, None] * x + phase[:, :, None])).sum(1)
    u_t = solve_burgers(u0, nu=0.02, t_end=0.3, dt=2e-3)
    return u0.float(), u_t.float()


# ----------------------------------------------------------------------------- model


class Attention(nn.Module):
    """Multi-head self-attention over tokens (batch, tokens, hidden)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def bias(self, tokens: int) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(t))
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, attention: type[Attention] = Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BurgersOperator(nn.Module):
    """u0 (batch, grid) -> u(T) (batch, grid); grid = tokens * patch."""

    def __init__(self, tokens: int, patch: int, hidden: int, depths: list[int], heads: int = 4):
        super().__init__()
        self.tokens, self.patch = tokens, patch
        self.embed = nn.Linear(2 * patch, hidden)  # each patch: its u0 values and x coordinates
        self.pos = nn.Parameter(torch.zeros(1, tokens, hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(sum(depths)))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, patch)

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        b, n = u0.shape
        x = torch.arange(n, device=u0.device, dtype=u0.dtype).expand(b, n) / n
        patches = torch.stack([u0, x], -1).view(b, self.tokens, 2 * self.patch)
        h = self.embed(patches) + self.pos
        for block in self.blocks:
            h = block(h)
        return u0 + self.head(self.norm(h)).reshape(b, n)  # residual: learn the change


# ----------------------------------------------------------------------------- training


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2], help="blocks per stage")
    p.add_argument("--tokens", type=int, default=24, help="patches per sample")
    p.add_argument("--patch", type=int, default=4, help="grid points per patch")
    p.add_argument("--hidden", type=int, default=80, help="model width")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-samples", type=int, default=720)
    p.add_argument("--val-samples", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=15, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", default=os.path.join(os.environ.get("ORCHD_JOB_DIR", "runs/burgers"), "checkpoints"))
    p.add_argument("--crash-at-step", type=int, default=None, help="SIGKILL self at this step")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step (a slower model)")
    p.add_argument("--nccl-error-at-step", type=int, default=None, help="print a NCCL error and hang")
    p.add_argument("--crash-on-attempt", type=int, default=1, help="... only on this $ORCHD_ATTEMPT")
    return p


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)  # several ranks share the CPU cores
    return dist.get_rank(), world


def evaluate(model: nn.Module, u0: torch.Tensor, ut: torch.Tensor, scale: float) -> tuple[float, float]:
    """(val_loss, nrmse): MSE of the normalised solution and mean relative L2 error."""
    model.eval()
    with torch.no_grad():
        pred = model(u0)
    model.train()
    val_loss = nn.functional.mse_loss(pred / scale, ut / scale).item()
    nrmse = ((pred - ut).norm(dim=1) / ut.norm(dim=1)).mean().item()
    return val_loss, nrmse


def train(model: nn.Module, args: argparse.Namespace, log_prefix: str = "") -> float:
    """Train ``model`` on freshly generated Burgers data; returns the last val_loss.

    Resumes from ``<ckpt-dir>/latest.pt`` when it exists (model, optimiser and step).
    """
    dev = device()
    rank, world = init_distributed()
    torch.manual_seed(args.seed)
    grid = args.tokens * args.patch
    t0 = time.time()
    u0, ut = make_dataset(args.train_samples + args.val_samples, grid, seed=1234)
    u0, ut = u0.to(dev), ut.to(dev)
    tr_u0, tr_ut = u0[: args.train_samples], ut[: args.train_samples]
    va_u0, va_ut = u0[args.train_samples :], ut[args.train_samples :]
    scale = tr_ut.std().item()  # losses in units of the solution's spread
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{log_prefix}data: {args.train_samples}+{args.val_samples} samples on {grid} points "
        f"solved in {time.time() - t0:.1f}s, device={dev}, ranks={world}", flush=True)

    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = args.train_samples // args.batch
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    ckpt_dir = Path(args.ckpt_dir)
    step = 0
    latest = ckpt_dir / "latest.pt"
    if latest.exists():
        state = torch.load(latest, map_location=dev)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
        say(f"{log_prefix}resumed from checkpoint {latest} at step {step}", flush=True)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)

    attempt = int(os.environ.get("ORCHD_ATTEMPT", "1"))
    gen = torch.Generator(device="cpu").manual_seed(args.seed + step)
    val_loss = float("nan")
    running = 0.0
    while step < total:
        order = torch.randperm(args.train_samples, generator=gen).to(dev)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * args.batch : (i + 1) * args.batch][rank::world]  # this rank's share
            loss = nn.functional.mse_loss(net(tr_u0[idx]) / scale, tr_ut[idx] / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if args.step_delay:
                time.sleep(args.step_delay)
            if args.crash_at_step == step and attempt == args.crash_on_attempt:
                print(f"{log_prefix}simulating a SIGKILL at step {step} (attempt {attempt})", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if args.nccl_error_at_step == step and attempt == args.crash_on_attempt:
                say(f"[rank{rank}] NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details), "
                    "NCCL version 2.21.5", flush=True)
                time.sleep(3600)  # a broken collective hangs rather than exits
            if rank != 0:
                continue
            if step % args.eval_every == 0 or step == total:
                val_loss, nrmse = evaluate(model, va_u0, va_ut, scale)
                epoch = (step - 1) // steps_per_epoch + 1
                train_loss = running / (args.eval_every if step % args.eval_every == 0 else step % args.eval_every)
                running = 0.0
                print(f"{log_prefix}step {step}/{total} epoch {epoch} train_loss={train_loss:.5f} "
                      f"val_loss={val_loss:.5f} nrmse={nrmse:.4f}", flush=True)
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "step": step, "config": vars(args)}
                torch.save(state, ckpt_dir / "latest.tmp")
                os.replace(ckpt_dir / "latest.tmp", latest)  # atomic: a kill never leaves half a file
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return val_loss


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # OMP_NUM_THREADS when given (jobs sharing a machine: more threads than cores make every one
    # of them spin-wait, 10-100x slower), else up to 4 cores
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(4, os.cpu_count() or 1))))
    model = BurgersOperator(args.tokens, args.patch, args.hidden, args.depths)
    n_params = sum(p.numel() for p in model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"burgers: depths={args.depths} tokens={args.tokens} hidden={args.hidden} params={n_params}", flush=True)
    t0 = time.time()
    val_loss = train(model, args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: final val_loss={val_loss:.5f} in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
