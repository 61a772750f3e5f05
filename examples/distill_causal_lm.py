"""Knowledge distillation of a Hugging Face Llama teacher into a smaller Llama student, with the fused
lossops.linear_distillation_loss against the unfused formula (both models' full logits, log_softmax, F.kl_div).

    python examples/distill_causal_lm.py                          # vocabulary 32000, 20 distillation steps
    python examples/distill_causal_lm.py --vocab 8000 --steps 10 --divergence jsd --temperature 2

Both models are built from LlamaConfigs (nothing is downloaded) and see token sequences generated in code (the
successor chains of examples/train_hf_causal_lm.py). The teacher is first trained on them for --teacher-steps steps
with lossops.linear_cross_entropy; then two copies of the same student are distilled from it on the same batches,
once per method, with the loss hard_weight * cross-entropy + soft_weight * divergence(teacher || student) on the
models' last hidden states and output layers. The table gives each method's median time per step (the first steps,
which include one-time allocations, left out), its peak memory of one step beyond what was alive before it (process
RSS on Linux: the fused loss's internal chunks of logits counted) and the final losses.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import transformers
from tqdm import tqdm

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repository: bench.measure's peak-RSS reading
import lossops  # noqa: E402
from lossops.losses.distillation import torch_distillation_loss  # noqa: E402
from _common import adamw, set_threads  # noqa: E402
from train_hf_causal_lm import successor_table, token_batch  # noqa: E402

_MIB = 1 << 20
_WARMUP_STEPS = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--divergence", choices=["forward_kl", "reverse_kl", "tvd", "jsd"], default="forward_kl")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def build_model(args, hidden: int, layers: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config)


def hidden_states(model, tokens):
    """The last hidden states that predict tokens[:, 1:]."""
    return model.model(tokens).last_hidden_state[:, :-1]


def fused_step_loss(student, teacher, tokens, args):
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, tokens)
    # the teacher's weight detached: a teacher tensor that requires grad would take the unfused formula
    return lossops.linear_distillation_loss(
        hidden_states(student, tokens), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight.detach(),
        tokens[:, 1:],
        divergence=args.divergence, beta=args.beta, temperature=args.temperature, hard_weight=args.hard_weight)


def unfused_step_loss(student, teacher, tokens, args):
    with torch.no_grad():
        teacher_logits = teacher.lm_head(hidden_states(teacher, tokens))
    return torch_distillation_loss(
        student.lm_head(hidden_states(student, tokens)), teacher_logits, tokens[:, 1:], divergence=args.divergence,
        beta=args.beta, temperature=args.temperature, hard_weight=args.hard_weight)


METHODS = {"fused (lossops)": fused_step_loss, "unfused (torch)": unfused_step_loss}


def train_teacher(teacher, batches, args) -> list[float]:
    optimizer = adamw(teacher, args.lr, 0.0)
    losses = []
    for tokens in tqdm(batches, desc="teacher", disable=args.quiet):
        loss = lossops.linear_cross_entropy(hidden_states(teacher, tokens), teacher.lm_head.weight, tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def peak_rss_bytes(step) -> float:
    """The peak resident memory one call of step() adds (NaN where it cannot be read)."""
    try:
        from bench.measure import PeakMemory
    except ImportError:
        return float("nan")
    memory = PeakMemory(torch.device("cpu"))
    peak = memory.measure(lambda: None, lambda _: step())
    return float("nan") if peak is None else float(peak)


def distill(student, teacher, batches, args, label, step_loss) -> dict:
    def one_step():
        step_loss(student, teacher, batches[0], args).backward()
        student.zero_grad(set_to_none=True)

    one_step()  # one-time allocations outside the measurement
    peak = peak_rss_bytes(one_step)
    optimizer = adamw(student, args.lr, 0.0)
    losses, step_ms = [], []
    with tqdm(batches, desc=label, disable=args.quiet) as bar:
        for tokens in bar:
            start = time.perf_counter()
            loss = step_loss(student, teacher, tokens, args)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_ms.append((time.perf_counter() - start) * 1e3)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    timed = step_ms[_WARMUP_STEPS:] or step_ms
    return {"losses": losses, "median_ms": statistics.median(timed), "peak_bytes": peak}


def run(args) -> dict:
    if args.threads:
        set_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    successors = successor_table(args.vocab, generator)
    teacher_batches = [token_batch(successors, args.batch_size, args.seq, generator) for _ in range(args.teacher_steps)]
    batches = [token_batch(successors, args.batch_size, args.seq, generator) for _ in range(args.steps)]
    torch.manual_seed(args.seed)
    teacher = build_model(args, args.teacher_hidden, args.teacher_layers)
    student = build_model(args, args.student_hidden, args.student_layers)
    teacher_losses = train_teacher(teacher, teacher_batches, args)
    teacher.eval()
    results = {label: distill(copy.deepcopy(student), teacher, batches, args, label, step_loss)
               for label, step_loss in METHODS.items()}
    return {"teacher_losses": teacher_losses, "results": results}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = run(args)
    tokens = args.batch_size * (args.seq - 1)
    logits_mib = tokens * args.vocab * 4 / _MIB
    print(f"distilling a {args.teacher_layers}-layer (hidden {args.teacher_hidden}) Llama into a {args.student_layers}"
          f"-layer (hidden {args.student_hidden}) one: vocabulary {args.vocab}, {tokens} tokens a step (one float32 "
          f"logits tensor: {logits_mib:.0f} MiB), {args.divergence}, temperature {args.temperature}, hard weight "
          f"{args.hard_weight}; torch threads {torch.get_num_threads()}")
    if out["teacher_losses"]:
        print(f"teacher cross-entropy {out['teacher_losses'][0]:.4f} -> {out['teacher_losses'][-1]:.4f}")
    print(f"{'method':<18} {'median ms/step':>15} {'peak MiB':>9} {'first loss':>11} {'last loss':>10}")
    for label, result in out["results"].items():
        print(f"{label:<18} {result['median_ms']:>15.1f} {result['peak_bytes'] / _MIB:>9.0f} "
              f"{result['losses'][0]:>11.4f} {result['losses'][-1]:>10.4f}")
    return out


if __name__ == "__main__":
    main()
