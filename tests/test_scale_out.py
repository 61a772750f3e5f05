"""lossops where training outgrows one process, end to end on gloo CPU processes: the Hugging Face patch under
FSDP2, a tensor-parallel LM head (and FSDP2 x TP on a 2-D mesh), torch.compile, concurrent forwards from threads,
DTensor beside plain-tensor arguments, and examples/train_hf_causal_lm.py --fsdp.

The oracle is always one process training the unpatched model on the whole batch: per-step losses, first-step
gradients and final parameters must match it. One spawn per scenario, its processes forked from a forkserver that
imports torch and transformers once for the file (fresh interpreters cost most of the time otherwise); tiny models
built from configs, nothing downloaded. Vocabularies and batches split unevenly over the ranks. What each test
shows, and what it costs: docs/transformers.md.
"""
import copy
import os
import statistics
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

import lossops
import lossops.integrations.transformers as lossops_hf
from lossops.integrations.transformers import UnsupportedModelError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from _cases import FORKSERVER_MMAP_THRESHOLD, spawn, start_forkserver  # noqa: E402
from _common import TensorMemoryPeak  # noqa: E402
import train_hf_causal_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
LR = 3e-3
# float32 after a few AdamW steps: the sharded runs sum in another order, and Adam's normalisation lifts the
# difference of small gradients to the size of a step (lr) at worst, hence the parameters' absolute tolerance.
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
PARAMETER_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def tiny_model(model_type: str, vocab: int):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab, **TINY)
    return transformers.AutoModelForCausalLM.from_config(config)


def token_batches(steps: int, rows: int, seq: int, vocab: int):
    """(input_ids, labels) per step: Zipf-distributed tokens (the loss falls within a few steps, as it learns the
    skew); each row's prompt (2 to 5 tokens, -100 in the labels) has another length, so the ranks' shares of a
    batch hold different numbers of trained tokens."""
    zipf = 1.0 / torch.arange(1, vocab - 2, dtype=torch.float)
    batches = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        input_ids = 3 + torch.multinomial(zipf, rows * seq, replacement=True, generator=generator).reshape(rows, seq)
        labels = input_ids.clone()
        for row in range(rows):
            labels[row, :2 + (row + step) % 4] = -100
        batches.append((input_ids, labels))
    return batches


def whole_batch_loss(model, input_ids, labels):
    """(the loss to differentiate, the whole batch's loss) when this process holds the whole batch."""
    loss = model(input_ids, labels=labels).loss
    return loss, loss.detach()


def data_parallel_loss(index: int, size: int, group=None):
    """This data-parallel rank's rows (torch.tensor_split: uneven when the rows do not divide) with
    num_items_in_batch = the whole batch's trained tokens, times the number of data-parallel ranks because FSDP
    averages the gradients, so each step's gradient is the whole batch's mean; the logged value is that mean."""
    def loss(model, input_ids, labels):
        items = (labels[:, 1:] != -100).sum()
        local = model(input_ids.tensor_split(size)[index], labels=labels.tensor_split(size)[index],
                      num_items_in_batch=items).loss
        value = local.detach().clone()
        dist.all_reduce(value, group=group)
        return local * size, value
    return loss


def train(model, batches, loss_of) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for input_ids, labels in batches:
        loss, value = loss_of(model, input_ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value.item())
    return losses


def full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def assert_same_gradients(model, reference, batch, loss_of, what: str, reference_loss_of=whole_batch_loss):
    """One backward of each on `batch`: AdamW is blind to a gradient's scale, so a wrong normalisation (a factor
    of the world size) would not show in the losses or parameters; it does here."""
    reference_loss_of(reference, *batch)[0].backward()
    loss_of(model, *batch)[0].backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(full(q.grad), p.grad, rtol=0, atol=1e-5 * scale,
                                   msg=lambda text: f"{what}, gradient of {name}: {text}")
    reference.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def assert_same_parameters(model, reference, what: str):
    names = [name for name, _ in reference.named_parameters()]
    assert [name for name, _ in model.named_parameters()] == names, what
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(full(q).detach(), p.detach(), **PARAMETER_TOLERANCE,
                                   msg=lambda text: f"{what}, {name}: {text}")


def shard_with_fsdp2(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def patched(model):
    lossops_hf.patch(model)
    return model


def _spawn(worker, nprocs: int, tmp_path, *args):
    """worker(rank, world_size, *args) in nprocs processes with a gloo group, forked from the forkserver."""
    spawn(_process, nprocs, worker, nprocs, str(tmp_path / "store"), args)


def _process(rank, worker, world_size, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


# --- 1. FSDP2: fully_shard per decoder layer and on the root ---------------------------------------------------------

FSDP_VOCAB, FSDP_ROWS, FSDP_SEQ, FSDP_STEPS = 4099, 8, 64, 10


def _process_peak_rss(run) -> "int | None":
    """Peak resident memory of this process while run() runs, above what it held before (Linux: the peak is reset
    through /proc/self/clear_refs); None where that reset is not available."""
    def status(key):
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(key))
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        before = status("VmRSS:")
        if status("VmHWM:") > before + (256 << 10):
            return None
    except OSError:
        return None
    run()
    return status("VmHWM:") - before


def _memory(model, input_ids, labels, measure_process_memory: bool) -> dict:
    """One forward+backward's peak memory, after one to warm up (FSDP2 initialises itself on the first): the
    tensor storage alive (TensorMemoryPeak, deterministic; it does not see memory inside an op) and the median
    of three peaks of process memory (which does)."""
    def step():
        model(input_ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    with TensorMemoryPeak() as tensors:
        step()
    rss = [_process_peak_rss(step) for _ in range(3)] if measure_process_memory else [None]
    return {"tensors": tensors.peak, "process": None if None in rss else statistics.median(rss)}


def _fsdp2_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # The process measure needs glibc's fixed mmap threshold from the process's start (_cases.start_forkserver): absent
    # when another forkserver was running first, and then left out (the tensor measure never is).
    measure_process_memory = os.environ.get("MALLOC_MMAP_THRESHOLD_") == FORKSERVER_MMAP_THRESHOLD
    mesh = init_device_mesh("cpu", (world_size,))
    batches = token_batches(FSDP_STEPS, FSDP_ROWS, FSDP_SEQ, FSDP_VOCAB)
    for model_type in ("llama", "qwen2"):
        initial = tiny_model(model_type, FSDP_VOCAB)
        reference = copy.deepcopy(initial)
        expected = train(reference, batches, whole_batch_loss)
        assert expected[-1] < expected[0] - 0.05, expected

        model = shard_with_fsdp2(patched(copy.deepcopy(initial)), mesh)
        input_ids, labels = (t.tensor_split(world_size)[rank] for t in batches[0])
        memory = {"patched": _memory(model, input_ids, labels, measure_process_memory)}
        assert_same_gradients(model, copy.deepcopy(initial), batches[0], data_parallel_loss(rank, world_size),
                              f"{model_type} FSDP2")
        losses = train(model, batches, data_parallel_loss(rank, world_size))
        torch.testing.assert_close(losses, expected, **LOSS_TOLERANCE, msg=lambda text: f"{model_type}: {text}")
        assert_same_parameters(model, reference, f"{model_type} FSDP2")

        unpatched = shard_with_fsdp2(copy.deepcopy(initial), mesh)
        memory["unpatched"] = _memory(unpatched, input_ids, labels, measure_process_memory)
        logits_bytes = input_ids.numel() * FSDP_VOCAB * 4
        if rank == 0:
            print(f"{model_type}: peak memory of one forward+backward on rank 0, bytes (logits: {logits_bytes}): "
                  f"{memory}")
        assert memory["patched"]["tensors"] + logits_bytes < memory["unpatched"]["tensors"], memory
        if None not in (memory["patched"]["process"], memory["unpatched"]["process"]):
            assert memory["patched"]["process"] + logits_bytes < memory["unpatched"]["process"], memory

    # An output layer with its own fully_shard is resharded before the loss would read it: refused, by name.
    model = patched(tiny_model("llama", 64))
    fully_shard(model.lm_head, mesh=mesh)
    with pytest.raises(UnsupportedModelError, match="output layer has its own fully_shard"):
        model(input_ids[:, :8] % 64, labels=labels[:, :8] % 64)
    model = tiny_model("llama", 64)
    fully_shard(model.lm_head, mesh=mesh)
    with pytest.raises(UnsupportedModelError, match="output layer has its own fully_shard"):
        lossops_hf.patch(model)


def test_fsdp2_llama_and_qwen2_train_as_one_process_does_in_less_memory(tmp_path):
    _spawn(_fsdp2_worker, 2, tmp_path)


# --- 2. The LM head tensor-parallel: ColwiseParallel, the loss vocabulary-parallel; 3 ranks, uneven shards ------------

TP_VOCAB, TP_ROWS, TP_SEQ, TP_STEPS = 385, 3, 16, 6  # classes over 3 ranks: 129 + 129 + 127 (torch.chunk)


def _class_weight(vocab: int) -> torch.Tensor:
    return torch.rand(vocab, generator=torch.Generator().manual_seed(5)) + 0.5


def smoothed_weighted_loss(model, input_ids, labels):
    """Label smoothing and class weights, which transformers' loss has not: lossops.linear_cross_entropy on the
    decoder's hidden states and the head's weight. With the head tensor-parallel the weight is a DTensor sharded
    on the vocabulary and the hidden states a plain tensor: the loss is vocabulary-parallel."""
    hidden = model.model(input_ids).last_hidden_state[:, :-1]
    loss = lossops.linear_cross_entropy(hidden, model.lm_head.weight, labels[:, 1:], weight=_class_weight(
        model.config.vocab_size), label_smoothing=0.1)
    loss = full(loss)
    return loss, loss.detach()


def smoothed_weighted_reference(model, input_ids, labels):
    logits = model(input_ids).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), weight=_class_weight(model.config.vocab_size),
                           label_smoothing=0.1)
    return loss, loss.detach()


def _tensor_parallel_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world_size,))
    batches = token_batches(TP_STEPS, TP_ROWS, TP_SEQ, TP_VOCAB)
    initial = tiny_model("llama", TP_VOCAB)

    def tensor_parallel(model):
        return parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})

    # The patched model: transformers' loss over the vocabulary-sharded head, and num_items_in_batch with it.
    model = patched(tensor_parallel(copy.deepcopy(initial)))
    assert isinstance(model.lm_head.weight, DTensor) and model.lm_head.weight.placements == (Shard(0),)
    assert model.lm_head.weight.to_local().shape[0] == [129, 129, 127][rank]
    assert_same_gradients(model, copy.deepcopy(initial), batches[0], whole_batch_loss, "tensor-parallel head")
    output = model(*batches[0][:1], labels=batches[0][1], num_items_in_batch=torch.tensor(37))
    expected = initial(*batches[0][:1], labels=batches[0][1], num_items_in_batch=torch.tensor(37))
    assert output.logits is None and type(output.loss) is torch.Tensor  # plain, the same on every rank
    torch.testing.assert_close(output.loss, expected.loss)
    reference = copy.deepcopy(initial)
    torch.testing.assert_close(train(model, batches, whole_batch_loss), train(reference, batches, whole_batch_loss),
                               **LOSS_TOLERANCE)
    assert_same_parameters(model, reference, "tensor-parallel head")

    # Label smoothing and class weights: lossops.linear_cross_entropy with the head's DTensor weight.
    model, reference = tensor_parallel(copy.deepcopy(initial)), copy.deepcopy(initial)
    assert_same_gradients(model, copy.deepcopy(initial), batches[0], smoothed_weighted_loss, "smoothing, weights",
                          smoothed_weighted_reference)
    torch.testing.assert_close(train(model, batches, smoothed_weighted_loss),
                               train(reference, batches, smoothed_weighted_reference), **LOSS_TOLERANCE)
    assert_same_parameters(model, reference, "label smoothing and class weights, tensor-parallel head")

    # causal_lm_loss over the vocabulary-sharded head composes num_items_in_batch, the softcap and the temperature
    # (Gemma 2's, Granite's and Cohere's logit transforms) around the vocabulary-parallel loss.
    input_ids, labels = batches[0]
    hidden = initial.model(input_ids).last_hidden_state.detach()
    bias = torch.randn(TP_VOCAB, generator=torch.Generator().manual_seed(6))
    options = dict(num_items_in_batch=torch.tensor(29), softcap=3.0, temperature=4.0)
    ours = [hidden.clone().requires_grad_(), distribute_tensor(initial.lm_head.weight.detach(), mesh, [Shard(0)]),
            distribute_tensor(bias, mesh, [Shard(0)])]
    ours[1].requires_grad_()
    ours[2].requires_grad_()
    theirs = [hidden.clone().requires_grad_(), initial.lm_head.weight.detach().clone().requires_grad_(),
              bias.clone().requires_grad_()]
    loss = lossops_hf.causal_lm_loss(ours[0], ours[1], labels, linear_bias=ours[2], **options)
    expected = lossops_hf.causal_lm_loss(theirs[0], theirs[1], labels, linear_bias=theirs[2], **options)
    assert type(loss) is torch.Tensor
    torch.testing.assert_close(loss, expected)
    (loss * 2.5).backward()
    (expected * 2.5).backward()
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(full(got.grad), want.grad)

    # Layouts lossops refuses name themselves (docs/distributed.md says what to do instead).
    weight = distribute_tensor(initial.lm_head.weight.detach(), mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"linear_weight sharded on the classes needs input replicated, got S\(0\)"):
        lossops.linear_cross_entropy(distribute_tensor(hidden, mesh, [Shard(0)]), weight, labels)
    with pytest.raises(ValueError, match=r"num_items_in_batch=.* replicated DTensor inputs only, not with an argument "
                                         r"placed as S\(0\)"):
        lossops.linear_cross_entropy(hidden, weight, labels, num_items_in_batch=9)
    rowwise = patched(parallelize_module(copy.deepcopy(initial), mesh, {"lm_head": RowwiseParallel(
        input_layouts=Replicate())}))
    with pytest.raises(ValueError, match=r"linear_weight sharded on its rows \(the classes, Shard\(0\)\), got S\(1\)"):
        rowwise(input_ids, labels=labels)

    _check_mixed_arguments(mesh)


def _check_mixed_arguments(mesh):
    """4. Plain tensors beside DTensors, every way round, on N = 13 rows (uneven over the ranks): a plain tensor
    counts as whole (replicated); values and gradients against torch on one process, float64."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    generator = torch.Generator().manual_seed(7)
    n, classes, features = 13, 11, 6
    logits = torch.randn(n, classes, dtype=torch.float64, generator=generator) * 3
    target = torch.randint(0, classes, (n,), generator=generator)
    target[::4] = -100
    weight = torch.rand(classes, dtype=torch.float64, generator=generator) + 0.3
    options = dict(weight=weight, label_smoothing=0.1)

    def check(ours, expected, leaves, what):
        assert isinstance(ours, DTensor), what
        torch.testing.assert_close(ours.full_tensor(), expected, msg=lambda text: f"{what}: {text}")
        upstream = torch.linspace(0.5, 2, expected.numel(), dtype=torch.float64).reshape(expected.shape)
        grads = torch.autograd.grad((ours.full_tensor() * upstream).sum(), [a for a, _ in leaves])
        expected_grads = torch.autograd.grad((expected * upstream).sum(), [b for _, b in leaves])
        for (leaf_, _), got, want in zip(leaves, grads, expected_grads):
            assert isinstance(got, DTensor) == isinstance(leaf_, DTensor), what  # a plain input's is plain
            torch.testing.assert_close(full(got), want, msg=lambda text: f"{what}, gradient: {text}")

    def leaf(t):
        return t.clone().requires_grad_()

    for reduction in ("mean", "sum", "none"):
        for placement in (Shard(0), Replicate()):
            # a plain input beside a DTensor target (before: torch's "mixed torch.Tensor and DTensor" error)
            x, x_ref = leaf(logits), leaf(logits)
            check(lossops.cross_entropy(x, distribute_tensor(target, mesh, [placement]), reduction=reduction,
                                        **options),
                  F.cross_entropy(x_ref, target, reduction=reduction, **options), [(x, x_ref)],
                  f"plain logits, target {placement}, {reduction}")
        for placement in (Shard(0), Shard(1)):
            # a plain target beside DTensor logits, batch- or class-sharded
            x, x_ref = distribute_tensor(logits, mesh, [placement]).requires_grad_(), leaf(logits)
            check(lossops.cross_entropy(x, target, reduction=reduction, **options),
                  F.cross_entropy(x_ref, target, reduction=reduction, **options), [(x, x_ref)],
                  f"logits {placement}, plain target, {reduction}")
        # plain logits and target beside a DTensor class weight; a keyword input
        x, x_ref = leaf(logits), leaf(logits)
        check(lossops.cross_entropy(input=x, target=target, weight=distribute_tensor(weight, mesh, [Replicate()]),
                                    reduction=reduction),
              F.cross_entropy(x_ref, target, weight=weight, reduction=reduction), [(x, x_ref)],
              f"plain keyword logits, DTensor class weight, {reduction}")
    # the linear variant: plain hidden states and bias beside the vocabulary-sharded weight, and the reverse
    hidden = torch.randn(n, features, dtype=torch.float64, generator=generator)
    head = torch.randn(classes, features, dtype=torch.float64, generator=generator)
    bias = torch.randn(classes, dtype=torch.float64, generator=generator)
    h, w, h_ref, w_ref = leaf(hidden), distribute_tensor(head, mesh, [Shard(0)]).requires_grad_(), leaf(hidden), leaf(
        head)
    check(lossops.linear_cross_entropy(h, w, target, linear_bias=bias, **options),
          F.cross_entropy(F.linear(h_ref, w_ref, bias), target, **options), [(h, h_ref), (w, w_ref)],
          "plain hidden, weight Shard(0)")
    h, w, h_ref, w_ref = distribute_tensor(hidden, mesh, [Shard(0)]).requires_grad_(), leaf(head), leaf(hidden), leaf(
        head)
    check(lossops.linear_cross_entropy(h, w, distribute_tensor(target, mesh, [Shard(0)]), **options),
          F.cross_entropy(F.linear(h_ref, w_ref), target, **options), [(h, h_ref), (w, w_ref)],
          "hidden Shard(0), plain weight")


def test_tensor_parallel_head_on_3_ranks_trains_as_one_process_and_mixed_arguments(tmp_path):
    _spawn(_tensor_parallel_worker, 3, tmp_path)


def _fsdp2_x_tensor_parallel_worker(rank, world_size):
    """FSDP2 over the data-parallel dimension of a (2, 2) mesh, the head ColwiseParallel over the other."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    batches = token_batches(TP_STEPS, TP_ROWS, TP_SEQ, TP_VOCAB)  # 3 rows: 2 + 1 over the data-parallel ranks
    initial = tiny_model("llama", TP_VOCAB)
    model = parallelize_module(copy.deepcopy(initial), mesh["tp"], {"lm_head": ColwiseParallel()})
    model = shard_with_fsdp2(patched(model), mesh["dp"])
    loss_of = data_parallel_loss(mesh["dp"].get_local_rank(), 2, mesh["dp"].get_group())
    assert_same_gradients(model, copy.deepcopy(initial), batches[0], loss_of, "FSDP2 x TP")
    reference = copy.deepcopy(initial)
    torch.testing.assert_close(train(model, batches, loss_of), train(reference, batches, whole_batch_loss),
                               **LOSS_TOLERANCE)
    assert_same_parameters(model, reference, "FSDP2 x TP")
    # Outside the root's forward the head's weight is FSDP's 2-D shard: a loss computed from it is refused, by name.
    input_ids, labels = batches[0]
    hidden = reference.model(input_ids).last_hidden_state
    with pytest.raises(ValueError, match=r"on a 1-D device mesh, got a 2-D mesh \(2, 2\)"):
        lossops_hf.causal_lm_loss(hidden, model.lm_head.weight, labels)


def test_fsdp2_x_tensor_parallel_head_on_a_2d_mesh_trains_as_one_process(tmp_path):
    _spawn(_fsdp2_x_tensor_parallel_worker, 4, tmp_path)


# --- 3. torch.compile of the patched model's training step ---------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_compiled_training_step_is_one_graph_with_eagers_losses(model_type):
    """The patched forward (decoder, head input, fused loss) as one graph: fullgraph=True raises at any graph break.
    aot_eager traces forward and backward through AOTAutograd as inductor does, without inductor's code generation
    (tens of seconds here; inductor's losses were checked by hand, docs/transformers.md)."""
    initial = tiny_model(model_type, 384)
    batches = token_batches(4, 2, 16, 384)
    eager = patched(copy.deepcopy(initial))
    compiled = patched(copy.deepcopy(initial))
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    step = torch.compile(compiled, fullgraph=True, backend=backend)

    def compiled_loss(model, input_ids, labels):
        output = step(input_ids, labels=labels)
        assert output.logits is None
        return output.loss, output.loss.detach()

    expected = train(eager, batches, whole_batch_loss)
    torch.testing.assert_close(train(compiled, batches, compiled_loss), expected, rtol=1e-6, atol=1e-6)
    assert_same_parameters(compiled, eager, "compiled")
    assert len(graphs) == 1  # compiled once, for every step
    assert "lossops.linear_cross_entropy.default" in {str(node.target) for node in graphs[0].graph.nodes}


# --- 5. Forwards of one patched model from several threads at once --------------------------------------------------

def test_concurrent_forwards_from_threads_each_get_their_own_loss_and_gradients():
    """Six threads call one patched model at once, four with labels and two without (logits, which a call of the
    head outside a fused forward must still give). A barrier in the first decoder layer holds every thread inside
    its forward until all are: each fused forward has begun before any reaches the head. Each loss, gradient and
    logits tensor must be the one the unpatched model gives for that thread's batch."""
    reference = tiny_model("llama", 384)
    model = patched(copy.deepcopy(reference))
    batches = token_batches(6, 2, 16, 384)
    parameters = list(model.parameters())
    expected = []
    for index, (input_ids, labels) in enumerate(batches):
        if index < 4:
            loss = reference(input_ids, labels=labels).loss
            expected.append((loss.detach(), torch.autograd.grad(loss, list(reference.parameters()))))
        else:
            expected.append(reference(input_ids).logits.detach())
    barrier = threading.Barrier(len(batches), timeout=60)

    def wait_for_every_thread(module, args):
        barrier.wait()  # returns an int: not the hook's result, which would replace the layer's arguments

    model.model.layers[0].register_forward_pre_hook(wait_for_every_thread)
    results, errors = [None] * len(batches), []

    def run(index):
        try:
            input_ids, labels = batches[index]
            if index < 4:
                loss = model(input_ids, labels=labels).loss
                results[index] = (loss.detach(), torch.autograd.grad(loss, parameters))
            else:
                results[index] = model(input_ids).logits.detach()
        except BaseException as error:  # reported below, with the thread's index
            errors.append((index, repr(error)))
            barrier.abort()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, (got, want) in enumerate(zip(results, expected)):
        if index < 4:
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6,
                                       msg=lambda text: f"thread {index}: {text}")
            for g, w in zip(got[1], want[1]):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * w.abs().max().item())
        else:
            torch.testing.assert_close(got, want, msg=lambda text: f"thread {index}, logits: {text}")


# --- 6. examples/train_hf_causal_lm.py --fsdp 2 ----------------------------------------------------------------------

def test_example_with_fsdp_2_spawns_and_logs_the_single_process_losses(capsys):
    tiny = "--steps 4 --hidden 32 --layers 1 --heads 2 --vocab 4000 --seq 32 --batch-size 3 --threads 1 --quiet"
    start_forkserver()  # the example forks its processes from it too (imported once for the file)
    sharded = train_hf_causal_lm.main(tiny.split() + ["--fsdp", "2"])
    out = capsys.readouterr().out
    assert "FSDP2 over 2 processes" in out and f"{sharded['patched'].losses[-1]:.4f}" in out
    single = train_hf_causal_lm.train(train_hf_causal_lm.parse_args(tiny.split()))
    for name in ("unpatched", "patched"):  # 3 rows: 2 on rank 0, 1 on rank 1
        assert sharded[name].losses == pytest.approx(single["unpatched"].losses, rel=1e-5), name
    logits_bytes = 2 * 32 * 4000 * 4  # rank 0's
    assert sharded["patched"].peak_bytes + logits_bytes < sharded["unpatched"].peak_bytes
