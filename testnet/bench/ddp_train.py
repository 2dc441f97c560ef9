#!/usr/bin/env python3
"""PyTorch data-parallel baseline for Loom's training benchmark (testnet/bench/train-bench.sh).

Trains a character-level GPT (nanoGPT-style, exactly the model Loom's Rust side trains) on a text
file with synchronous data parallelism over the gloo backend, on CPU, and writes progress as JSON
lines so that report.py can compare it with `loom-peer train`.

Launch with torchrun (one process per host), e.g.
    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29555 ddp_train.py \
        --data tinyshakespeare.txt --steps 200 --progress ddp.jsonl
It also runs as a plain single process (no torchrun: world size 1, no communication).

Two gradient-exchange modes, both with exactly DDP's arithmetic (gradients averaged over all
ranks after every step, then a local optimizer step on identical replicas):
  * default, "DDP-equivalent (gloo all-reduce every step)": each rank runs forward and backward
    locally (timed as compute), then all-reduces ONE flattened buffer of all gradients with
    `dist.all_reduce` (timed as comm: flatten + all-reduce + copy back), divides by the world
    size, clips and steps (timed as compute). Compute and communication are then separately
    measurable, at the price of not overlapping them (DDP's bucketed backward overlap is lost;
    for a model this size on CPU the difference is small and is the honest upper bound).
  * --ddp-module: wraps the model in torch.nn.parallel.DistributedDataParallel (bucketed
    all-reduce overlapped with backward). Communication cannot be separated from compute there,
    so compute_s counts forward + backward + step and comm_s is reported as null.

Model: wte Embedding(V, C), wpe Embedding(T, C); per block ln_1, attn.c_attn Linear(C, 3C),
causal SDPA over (B, H, T, C/H), attn.c_proj Linear(C, C), residual, ln_2, mlp.c_fc Linear(C, 4C),
exact GELU, mlp.c_proj Linear(4C, C), residual; ln_f; lm_head Linear(C, V, bias=False), untied.
Init normal(0, 0.02), c_proj weights normal(0, 0.02/sqrt(2L)), biases 0, LayerNorm 1/0.
AdamW(lr 1e-3, betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on >=2-D params), clip norm 1.0.

Validation (rank 0, every --eval-every steps and at the end) is deterministic and identical to the
Rust side: n = eval_batches*batch sequences, span = len(val) - context - 1, sequence j starts at
j*span//n, evaluated in batches of `batch`; the loss is the mean of per-batch mean losses.

Progress (rank 0, one JSON object per line, flushed): per step
  {"system": "ddp", "step", "tokens" (world*batch*context*step), "wall_s", "train_loss"
   (mean over ranks), "val_loss" (eval steps only), "compute_s", "comm_s", "eval_s"}
a step-0 line with the initial model's val loss first, and a last line with "final": true plus run facts (params, world, time to --target-loss).
"""
import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(c, 3 * c)
        self.attn.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(c, 4 * c)
        self.mlp.c_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, context, layers, heads, width):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, eps=1e-5)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.layers = layers

    def initialize(self, seed):
        """nanoGPT's initialization, drawn exactly as the Rust learner draws it: after
        manual_seed(seed), parameters in sorted-name order, each normal tensor drawn on the CPU
        generator; zeros and ones draw nothing. Both systems start from the same weights."""
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if name.endswith(".bias"):
                    p.zero_()
                elif "ln_" in name:
                    p.fill_(1.0)
                elif name.endswith("c_proj.weight"):
                    p.copy_(torch.empty(p.shape).normal_(0.0, 0.02 / math.sqrt(2 * self.layers)))
                else:  # Linear weights and embeddings
                    p.copy_(torch.empty(p.shape).normal_(0.0, 0.02))

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def load_data(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        sys.exit(f"ddp_train: cannot read --data {path}: {e.strerror}")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], len(chars)


def batch_at(data, starts, context):
    x = torch.stack([data[s:s + context] for s in starts])
    y = torch.stack([data[s + 1:s + 1 + context] for s in starts])
    return x, y


@torch.no_grad()
def evaluate(model, val, batch, context, eval_batches):
    n = eval_batches * batch
    span = len(val) - context - 1
    if span <= 0:
        sys.exit(f"ddp_train: validation split ({len(val)} tokens) shorter than context {context}")
    starts = [j * span // n for j in range(n)]
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, n, batch):
        x, y = batch_at(val, starts[i:i + batch], context)
        losses.append(model(x, y).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def main():
    ap = argparse.ArgumentParser(description="PyTorch DDP baseline (gloo, CPU) for Loom's train bench")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--batch", type=int, default=12, help="per-rank batch (sequences)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--progress", default="", help="JSON-lines progress file (rank 0)")
    ap.add_argument("--target-loss", type=float, default=None,
                    help="report the first eval at or below this val loss (training continues)")
    ap.add_argument("--ddp-module", action="store_true",
                    help="use torch DistributedDataParallel instead of the explicit all-reduce")
    ap.add_argument("--timeout-s", type=float, default=600, help="collective timeout")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1

    train, val, vocab = load_data(args.data)
    if len(train) <= args.context + 1:
        sys.exit(f"ddp_train: training split ({len(train)} tokens) shorter than context {args.context}")
    model = GPT(vocab, args.context, args.layers, args.heads, args.width)
    model.initialize(1337)
    params = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    net = model
    if args.ddp_module and distributed:
        net = nn.parallel.DistributedDataParallel(model)
    explicit = distributed and not args.ddp_module
    mode = "ddp-module" if args.ddp_module and distributed else (
        "explicit-allreduce" if distributed else "single-process")
    gen = torch.Generator().manual_seed(1337 + rank)
    hi = len(train) - args.context - 1  # exclusive upper bound for a start offset

    out = None
    if rank == 0 and args.progress:
        os.makedirs(os.path.dirname(os.path.abspath(args.progress)), exist_ok=True)
        out = open(args.progress, "w")

    def emit(rec):
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    if rank == 0:
        print(f"ddp_train: world {world}, mode {mode}, params {n_params}, vocab {vocab}, "
              f"train {len(train)} val {len(val)} tokens", file=sys.stderr, flush=True)
    if distributed:
        dist.barrier()  # start every rank's clock together
    t0 = time.perf_counter()
    compute_s = comm_s = eval_s = 0.0
    target_hit = None
    val_loss = None
    if rank == 0:  # the initial model's loss (Loom reports it as round 0)
        val_loss = evaluate(model, val, args.batch, args.context, args.eval_batches)
        eval_s = time.perf_counter() - t0
        emit({"system": "ddp", "step": 0, "tokens": 0, "train_loss": None, "val_loss": round(val_loss, 5),
              "wall_s": round(eval_s, 4), "compute_s": 0.0,
              "comm_s": 0.0 if explicit or not distributed else None, "eval_s": round(eval_s, 4)})
    for step in range(1, args.steps + 1):
        c0 = time.perf_counter()
        starts = torch.randint(0, hi, (args.batch,), generator=gen).tolist()
        x, y = batch_at(train, starts, args.context)
        opt.zero_grad(set_to_none=True)
        loss = net(x, y)
        loss.backward()
        compute_s += time.perf_counter() - c0
        loss_v = loss.detach()
        if explicit:
            m0 = time.perf_counter()
            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads] + [loss_v.reshape(1)])
            dist.all_reduce(flat)
            flat /= world
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
            loss_v = flat[off]
            comm_s += time.perf_counter() - m0
        elif distributed:  # DDP module: gradients are already averaged; average the loss for the log
            loss_v = loss_v.clone()
            dist.all_reduce(loss_v)
            loss_v /= world
        c1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        compute_s += time.perf_counter() - c1

        rec = {"system": "ddp", "step": step, "tokens": world * args.batch * args.context * step,
               "train_loss": round(loss_v.item(), 5)}
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            e0 = time.perf_counter()
            val_loss = evaluate(model, val, args.batch, args.context, args.eval_batches)
            eval_s += time.perf_counter() - e0
            rec["val_loss"] = round(val_loss, 5)
            print(f"ddp_train: step {step} train {loss_v.item():.4f} val {val_loss:.4f} "
                  f"wall {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        rec.update(wall_s=round(time.perf_counter() - t0, 4), compute_s=round(compute_s, 4),
                   comm_s=round(comm_s, 4) if explicit or not distributed else None,
                   eval_s=round(eval_s, 4))
        if ("val_loss" in rec and target_hit is None and args.target_loss is not None
                and rec["val_loss"] <= args.target_loss):
            target_hit = {"step": step, "tokens": rec["tokens"], "wall_s": rec["wall_s"]}
        emit(rec)

    if distributed:
        dist.barrier()
    wall = time.perf_counter() - t0
    emit({"system": "ddp", "final": True, "step": args.steps,
          "tokens": world * args.batch * args.context * args.steps, "wall_s": round(wall, 4),
          "val_loss": round(val_loss, 5) if val_loss is not None else None,
          "compute_s": round(compute_s, 4),
          "comm_s": round(comm_s, 4) if explicit or not distributed else None,
          "eval_s": round(eval_s, 4), "params": n_params, "world": world, "mode": mode,
          "batch": args.batch, "context": args.context, "threads": args.threads,
          "target_loss": args.target_loss, "target_reached": target_hit})
    if rank == 0:
        print(f"ddp_train: done {args.steps} steps in {wall:.1f}s ({wall / args.steps:.3f} s/step), "
              f"compute {compute_s:.1f}s comm {f'{comm_s:.1f}s' if explicit or not distributed else 'n/a'} "
              f"eval {eval_s:.1f}s",
              file=sys.stderr, flush=True)
    if out:
        out.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
