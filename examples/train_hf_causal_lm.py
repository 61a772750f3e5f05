"""A Hugging Face Llama trained twice, unpatched and with lossops.integrations.transformers.patch(): same losses,
less memory.

    python examples/train_hf_causal_lm.py                      # 40 steps of a 4-layer Llama, vocabulary 32000
    python examples/train_hf_causal_lm.py --steps 10 --vocab 8000 --threads 1
    python examples/train_hf_causal_lm.py --fsdp 2 --steps 10 --vocab 8000 --threads 1  # FSDP2, 2 processes
    torchrun --nproc-per-node 2 examples/train_hf_causal_lm.py --fsdp 2 --steps 10 --vocab 8000 --threads 1

The model is built from a LlamaConfig (nothing is downloaded) and trained on token sequences generated in code:
each token is followed by one of four fixed successors, drawn from a Zipf-like distribution, so the loss falls
quickly at first (the skewed marginal) and then more slowly (the successors). Both runs start from the same
weights and see the same batches. The table gives the median time per step (the first steps, which include
one-time allocations, are left out) and the peak memory of one forward+backward, measured as the peak bytes of
tensor storage alive (examples/_common.TensorMemoryPeak: deterministic, the same on CPU and GPU).

With --fsdp N both runs are sharded with FSDP2 (torch.distributed.fsdp.fully_shard on each decoder layer, then on
the root) over N processes, spawned here (gloo on CPU, NCCL with one GPU per process) or started by torchrun (N
is then its world size). Each process trains on its share of every batch's rows; the loss is the mean over all
ranks' tokens (num_items_in_batch = the global token count, times N because FSDP averages the gradients), so
the logged losses are those of the single-process run. The memory is rank 0's.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lossops.integrations.transformers as lossops_hf  # noqa: E402
from _common import TensorMemoryPeak, adamw, pick_device, set_threads  # noqa: E402

_MIB = 1 << 20
_WARMUP_STEPS = 2  # left out of the median time per step


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # one forward+backward, TensorMemoryPeak

    @property
    def median_step_ms(self) -> float:
        timed = self.step_ms[_WARMUP_STEPS:] or self.step_ms
        return statistics.median(timed)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", type=int, default=0, metavar="N",
                   help="shard both runs with FSDP2 over N processes (spawned here, or torchrun's world of N)")
    args = p.parse_args(argv)
    if args.fsdp < 0 or args.fsdp == 1 or args.fsdp > args.batch_size:
        p.error(f"--fsdp needs 2 to --batch-size ({args.batch_size}) processes, got {args.fsdp}")
    return args


def successor_table(vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(vocab, 4): each token's possible next tokens, drawn with probability ~ 1 / rank."""
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float)
    return torch.multinomial(zipf, vocab * 4, replacement=True, generator=generator).reshape(vocab, 4)


def token_batch(successors: torch.Tensor, batch_size: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(batch_size, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(successors.shape[0], (batch_size,), generator=generator)
    choices = torch.randint(successors.shape[1], (batch_size, seq), generator=generator)
    for t in range(1, seq):
        tokens[:, t] = successors[tokens[:, t - 1], choices[:, t]]
    return tokens


def build_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                      max_position_embeddings=args.seq, use_cache=False)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config)


def whole_batch_loss(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to differentiate, the loss of the whole batch) for one process holding the whole batch."""
    loss = model(tokens, labels=tokens).loss
    return loss, loss.detach()


def train_once(model, batches: list[torch.Tensor], args: argparse.Namespace, label: str,
               step_loss=whole_batch_loss) -> RunResult:
    result = RunResult()
    with TensorMemoryPeak() as memory:
        step_loss(model, batches[0])[0].backward()
    result.peak_bytes = memory.peak
    model.zero_grad(set_to_none=True)

    optimizer = adamw(model, args.lr, args.weight_decay)
    synchronize = torch.cuda.synchronize if batches[0].is_cuda else lambda: None
    with tqdm(batches, desc=label, disable=args.quiet, leave=True) as bar:
        for tokens in bar:
            synchronize()
            start = time.perf_counter()
            loss, logged = step_loss(model, tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            result.step_ms.append((time.perf_counter() - start) * 1e3)
            result.losses.append(logged.item())
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", refresh=False)
    return result


def make_batches(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    successors = successor_table(args.vocab, generator)
    return [token_batch(successors, args.batch_size, args.seq, generator).to(device) for _ in range(args.steps)]


def train(args: argparse.Namespace) -> dict[str, RunResult]:
    set_threads(args.threads)
    device = pick_device(args.device)
    batches = make_batches(args, device)
    unpatched = build_model(args).to(device)
    patched = copy.deepcopy(unpatched)
    lossops_hf.patch(patched)
    return {"unpatched": train_once(unpatched, batches, args, "unpatched"),
            "patched": train_once(patched, batches, args, "patched")}


def train_fsdp(args: argparse.Namespace) -> dict[str, RunResult]:
    """Both runs sharded with FSDP2 over args.fsdp processes: torchrun's, or spawned here. Rank 0's results."""
    if "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        if int(os.environ["WORLD_SIZE"]) != args.fsdp:
            raise SystemExit(f"--fsdp {args.fsdp} under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}")
        return fsdp_process(int(os.environ["RANK"]), args, "env://")
    set_threads(args.threads)  # this process's too: the summary reports it
    port = os.environ.get("MASTER_PORT") or str(_free_port())
    # Forked from a server that imports torch and transformers once, rather than N interpreters each importing
    # them (seconds each); spawned where there is no forkserver (Windows).
    start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload([
            "torch", "transformers", "lossops.integrations.transformers", "transformers.models.llama.modeling_llama",
            "tqdm"])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "results.json")
        mp.start_processes(_spawned_process, args=(args, f"tcp://127.0.0.1:{port}", path), nprocs=args.fsdp,
                           join=True, start_method=start_method)
        with open(path) as file:
            return {name: RunResult(**fields) for name, fields in json.load(file).items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_process(rank: int, args: argparse.Namespace, init_method: str, path: str) -> None:
    outcome = fsdp_process(rank, args, init_method)
    if rank == 0:  # plain values: the parent may know this module under another name than the children do
        with open(path, "w") as file:
            json.dump({name: vars(result) for name, result in outcome.items()}, file)


def fsdp_process(rank: int, args: argparse.Namespace, init_method: str) -> dict[str, RunResult]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    set_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=args.fsdp, timeout=datetime.timedelta(minutes=5))
    try:
        mesh = init_device_mesh(device.type, (args.fsdp,))
        batches = make_batches(args, device)  # the same on every rank, from the same seed
        unpatched = build_model(args).to(device)
        patched = copy.deepcopy(unpatched)
        lossops_hf.patch(patched)
        for model in (unpatched, patched):
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)

        def sharded_loss(model, tokens):
            # This rank's rows; the sum of its tokens' losses over all ranks' token count, times the world size
            # because FSDP averages the gradients: the gradient of the whole batch's mean.
            rows = tokens.tensor_split(args.fsdp)[rank]
            items = torch.tensor(tokens.shape[0] * (tokens.shape[1] - 1), device=device)
            loss = model(rows, labels=rows, num_items_in_batch=items).loss
            logged = loss.detach().clone()
            dist.all_reduce(logged)
            return loss * args.fsdp, logged

        quiet = args.quiet or rank != 0
        runs = {}
        for name, model in (("unpatched", unpatched), ("patched", patched)):
            runs[name] = train_once(model, batches, argparse.Namespace(**{**vars(args), "quiet": quiet}),
                                    f"{name} (FSDP2, {args.fsdp} processes)", sharded_loss)
        return runs
    finally:
        dist.destroy_process_group()


def summary(results: dict[str, RunResult], args: argparse.Namespace) -> str:
    unpatched, patched = results["unpatched"], results["patched"]
    rows = -(-args.batch_size // args.fsdp) if args.fsdp else args.batch_size  # rank 0's rows under FSDP
    logits_mib = rows * args.seq * args.vocab * 4 / _MIB
    rows = [("median time per step (ms)", unpatched.median_step_ms, patched.median_step_ms, ".1f"),
            ("peak tensor memory, fwd+bwd (MiB)", unpatched.peak_bytes / _MIB, patched.peak_bytes / _MIB, ".1f"),
            ("first loss", unpatched.losses[0], patched.losses[0], ".4f"),
            ("final loss", unpatched.losses[-1], patched.losses[-1], ".4f")]
    difference = max(abs(a - b) for a, b in zip(unpatched.losses, patched.losses))
    sharding = f"; FSDP2 over {args.fsdp} processes (logits and memory: rank 0's)" if args.fsdp else ""
    lines = [f"Llama: {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}; batch {args.batch_size} x "
             f"{args.seq} tokens; float32 logits would be {logits_mib:.1f} MiB; torch threads "
             f"{torch.get_num_threads()}{sharding}",
             f"| {'':<34} | {'unpatched':>10} | {'patched':>10} |", f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|"]
    lines += [f"| {name:<34} | {a:>10{fmt}} | {b:>10{fmt}} |" for name, a, b, fmt in rows]
    lines.append(f"largest per-step loss difference over {len(unpatched.losses)} steps: {difference:.2e}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, RunResult]:
    args = parse_args(argv)
    results = train_fsdp(args) if args.fsdp else train(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary(results, args))
    return results


if __name__ == "__main__":
    main()
