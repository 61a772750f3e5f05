"""A Hugging Face Llama trained twice, unpatched and with lossops.integrations.transformers.patch(): same losses,
less memory.

    python examples/train_hf_causal_lm.py                      # 40 steps of a 4-layer Llama, vocabulary 32000
    python examples/train_hf_causal_lm.py --steps 10 --vocab 8000 --threads 1

The model is built from a LlamaConfig (nothing is downloaded) and trained on token sequences generated in code:
each token is followed by one of four fixed successors, drawn from a Zipf-like distribution, so the loss falls
quickly at first (the skewed marginal) and then more slowly (the successors). Both runs start from the same
weights and see the same batches. The table gives the median time per step (the first steps, which include
one-time allocations, are left out) and the peak memory of one forward+backward, measured as the peak bytes of
tensor storage alive (examples/_common.TensorMemoryPeak: deterministic, the same on CPU and GPU).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
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
    return p.parse_args(argv)


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


def train_once(model, batches: list[torch.Tensor], args: argparse.Namespace, label: str) -> RunResult:
    result = RunResult()
    with TensorMemoryPeak() as memory:
        model(batches[0], labels=batches[0]).loss.backward()
    result.peak_bytes = memory.peak
    model.zero_grad(set_to_none=True)

    optimizer = adamw(model, args.lr, args.weight_decay)
    synchronize = torch.cuda.synchronize if batches[0].is_cuda else lambda: None
    with tqdm(batches, desc=label, disable=args.quiet, leave=True) as bar:
        for tokens in bar:
            synchronize()
            start = time.perf_counter()
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            result.step_ms.append((time.perf_counter() - start) * 1e3)
            result.losses.append(loss.item())
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", refresh=False)
    return result


def train(args: argparse.Namespace) -> dict[str, RunResult]:
    set_threads(args.threads)
    device = pick_device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    successors = successor_table(args.vocab, generator)
    batches = [token_batch(successors, args.batch_size, args.seq, generator).to(device) for _ in range(args.steps)]
    unpatched = build_model(args).to(device)
    patched = copy.deepcopy(unpatched)
    lossops_hf.patch(patched)
    return {"unpatched": train_once(unpatched, batches, args, "unpatched"),
            "patched": train_once(patched, batches, args, "patched")}


def summary(results: dict[str, RunResult], args: argparse.Namespace) -> str:
    unpatched, patched = results["unpatched"], results["patched"]
    logits_mib = args.batch_size * args.seq * args.vocab * 4 / _MIB
    rows = [("median time per step (ms)", unpatched.median_step_ms, patched.median_step_ms, ".1f"),
            ("peak tensor memory, fwd+bwd (MiB)", unpatched.peak_bytes / _MIB, patched.peak_bytes / _MIB, ".1f"),
            ("first loss", unpatched.losses[0], patched.losses[0], ".4f"),
            ("final loss", unpatched.losses[-1], patched.losses[-1], ".4f")]
    difference = max(abs(a - b) for a, b in zip(unpatched.losses, patched.losses))
    lines = [f"Llama: {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}; batch {args.batch_size} x "
             f"{args.seq} tokens; float32 logits would be {logits_mib:.1f} MiB; torch threads "
             f"{torch.get_num_threads()}",
             f"| {'':<34} | {'unpatched':>10} | {'patched':>10} |", f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|"]
    lines += [f"| {name:<34} | {a:>10{fmt}} | {b:>10{fmt}} |" for name, a, b, fmt in rows]
    lines.append(f"largest per-step loss difference over {len(unpatched.losses)} steps: {difference:.2e}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, RunResult]:
    args = parse_args(argv)
    results = train(args)
    print(summary(results, args))
    return results


if __name__ == "__main__":
    main()
