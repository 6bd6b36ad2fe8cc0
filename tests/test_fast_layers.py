"""Inference forms (modules/fast_layers.py): the same function as the research forms, on every device.

Each form is checked against the layer it replaces on random factors (outputs and dense weights), the
stacked first product against unstacked layers (including an input modified in place between siblings),
and whole tiny LLaMA / OPT models: siblings found by running the model, logits and greedy tokens unchanged."""
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import ROOT
from modules.fast_layers import FastColID, FastPair, FastRowID, SiblingGroup, fast_layer, to_inference_form
from modules.model_utils import find_linears, replace_module

sys.path.insert(0, str(ROOT / "tools"))
from bench_inference import FORM_BUILDER, build_layer  # noqa: E402  (the pipeline's factory, one method per form)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _compressed(lin: nn.Linear, form: str, ratio: float = 0.6) -> nn.Module:
    return build_layer(lin, ratio, form, 1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", list(FORM_BUILDER))
@pytest.mark.parametrize("bias", [False, True])
def test_each_form_computes_what_the_research_layer_computes(device, form, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias).to(device)
    slow = _compressed(lin, form)
    fast = fast_layer(slow)
    assert type(fast) is {"cur": FastPair, "svd": FastPair, "rowid": FastRowID, "colid": FastColID}[form]
    for shape in [(1, 48), (7, 48), (2, 3, 48), (0, 48)]:
        x = torch.randn(*shape, device=device)
        want, got = slow(x), fast(x)
        assert got.shape == want.shape and got.device.type == device
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.dense_weight(), slow.dense_weight(), rtol=1e-5, atol=1e-5)
    if form == "cur":  # two products, U folded into C: fewer parameters than C, U, R
        assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in slow.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_row_id_with_every_row_kept_has_no_interpolated_part(device):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(device)
    slow = _compressed(lin, "rowid", ratio=1.0)
    assert slow.rank == 8
    x = torch.randn(3, 16, device=device)
    torch.testing.assert_close(fast_layer(slow)(x), slow(x), rtol=1e-5, atol=1e-5)


def _siblings(device, forms=("svd", "rowid", "cur"), widths=(24, 40, 13)) -> list:
    torch.manual_seed(1)
    layers = []
    for form, m in zip(forms, widths):
        layers.append(fast_layer(_compressed(nn.Linear(32, m).to(device), form)))
    return layers


@pytest.mark.parametrize("device", DEVICES)
def test_sibling_group_computes_once_and_equals_separate_layers(device):
    """Pair and row-ID members mixed, widths that need padding (13, 40): same outputs as the layers alone."""
    alone = _siblings(device, forms=("svd", "rowid", "cur", "rowid"), widths=(24, 40, 13, 19))
    shared = _siblings(device, forms=("svd", "rowid", "cur", "rowid"), widths=(24, 40, 13, 19))
    group = SiblingGroup(shared)
    assert all(lay.B is None for lay in shared) and list(group.offsets) == sorted(group.offsets)
    assert all(off % 8 == 0 for off in group.offsets)
    x = torch.randn(2, 5, 32, device=device)
    outs = [lay(x) for lay in shared]
    assert group.computed == 1  # one pass for the four siblings
    assert group._outs is None and group._x is None  # released once every sibling took its part
    for lay_alone, got in zip(alone, outs):
        torch.testing.assert_close(got, lay_alone(x), rtol=1e-5, atol=1e-5)
    for lay_alone, lay in zip(alone, shared):
        torch.testing.assert_close(lay.dense_weight(), lay_alone.dense_weight())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forms, widths, bundles", [
    (("svd", "svd", "rowid", "rowid", "rowid", "cur"), (24, 24, 40, 40, 16, 24), {0: (0, 0), 1: (0, 1), 2: (2, 0), 3: (2, 1)}),
    (("colid", "colid", "colid"), (24, 24, 13), {0: (0, 0), 1: (0, 1)})])
def test_bundles_of_equal_siblings_run_batched_and_equal_separate_layers(device, forms, widths, bundles):
    """Neighbouring siblings of one kind and shape are stacked into one batched product (biases too):
    same outputs and dense weights as the layers alone, for one token (written in place), a few, and
    more than BATCHED_MAX_TOKENS (each member alone on its slices of the stacks)."""
    from modules.fast_layers import BATCHED_MAX_TOKENS, ColIDGroup
    alone = _siblings(device, forms=forms, widths=widths)
    shared = _siblings(device, forms=forms, widths=widths)
    group = (ColIDGroup if forms[0] == "colid" else SiblingGroup)(shared)
    assert group.bundle_of == bundles
    stacked = dict(group.named_parameters())
    assert ("C_0" if forms[0] == "colid" else "A_0") in stacked and "bias_0" in stacked
    assert all(lay.bias is None for lay in shared[:2])  # a pair bundle's biases moved to the group
    for shape in [(1, 32), (5, 32), (2, 3, 32), (BATCHED_MAX_TOKENS + 1, 32)]:
        x = torch.randn(*shape, device=device)
        outs = [lay(x) for lay in shared]
        for lay_alone, got in zip(alone, outs):
            torch.testing.assert_close(got, lay_alone(x), rtol=1e-5, atol=1e-5)
    assert group.computed == 4
    for lay_alone, lay in zip(alone, shared):
        torch.testing.assert_close(lay.dense_weight(), lay_alone.dense_weight())


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_product_is_recomputed_for_an_input_modified_in_place(device):
    alone = _siblings(device)
    shared = _siblings(device)
    group = SiblingGroup(shared)
    x = torch.randn(3, 32, device=device)
    first = shared[0](x)
    x.mul_(2.0)  # same tensor object, new values: the cached product must not be reused
    second = shared[1](x)
    torch.testing.assert_close(first, alone[0](x / 2.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, alone[1](x), rtol=1e-5, atol=1e-5)
    # a sibling called twice with the same input recomputes rather than miscounting
    y = torch.randn(3, 32, device=device)
    torch.testing.assert_close(shared[2](y), alone[2](y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[2](y), alone[2](y), rtol=1e-5, atol=1e-5)
    assert group.computed == 4


def _tiny(family: str, device: str):
    """Not bench_pipeline's tiny shapes: grouped-query attention (k/v narrower than q), so q/k/v groups have
    members of unequal widths; most of their ranks at ratio 0.6 are no multiples of 8, so the stack pads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=112, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=64)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("form", list(FORM_BUILDER))
def test_model_in_inference_form_gives_the_same_logits_and_tokens(device, family, form):
    model = _tiny(family, device)
    for info in find_linears(model):
        replace_module(info, _compressed(info.module, form))
    ids = torch.randint(0, 96, (2, 12), device=device)
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    report = to_inference_form(model)
    assert report["converted"] == (14 if family == "llama" else 12)
    assert report["skipped"] == [] and len(find_linears(model, types=(FastPair, FastRowID, FastColID))) == report["converted"]
    names = {tuple(n.rsplit(".", 1)[1] for n in g) for g in report["groups"]}
    # bundles (batched second products): members of one shape next to each other; grouped-query
    # attention's k/v are narrower than q
    bundled = {tuple(n.rsplit(".", 1)[1] for n in g if model.get_submodule(n).slot in model.get_submodule(n).group.bundle_of)
               for g in report["groups"]}
    if family == "llama":
        assert names == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")} and len(report["groups"]) == 4
        assert bundled == {("k_proj", "v_proj"), ("gate_proj", "up_proj")}
    else:
        assert names == {("q_proj", "k_proj", "v_proj")} and len(report["groups"]) == 2
        assert bundled == {("q_proj", "k_proj", "v_proj")}
    with torch.no_grad():
        got = model(ids).logits
        got_gen = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_gen, want_gen)


def test_inference_form_leaves_dense_layers_and_counts_only_compressed_ones():
    model = _tiny("llama", "cpu")
    infos = find_linears(model)
    for info in infos[:3]:  # q/k/v of block 0 compressed, the rest dense
        replace_module(info, _compressed(info.module, "svd"))
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        want = model(ids).logits
    report = to_inference_form(model)
    assert report["converted"] == 3 and len(report["groups"]) == 1
    assert sum(isinstance(i.module, nn.Linear) for i in find_linears(model)) == len(infos) - 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_model_in_inference_form_moves_copies_and_frees_like_any_module(device):
    """.to(), deepcopy and del behave: a copy computes on its own tensors; no reference cycle keeps a
    dropped model's layers alive."""
    import copy
    import gc
    import weakref
    model = _tiny("llama", "cpu")
    for info in find_linears(model):
        replace_module(info, _compressed(info.module, "rowid"))
    ids = torch.randint(0, 96, (1, 8))
    to_inference_form(model)
    with torch.no_grad():
        want = model(ids).logits
        model.to(device)
        torch.testing.assert_close(model(ids.to(device)).logits.cpu(), want, rtol=1e-4, atol=1e-4)
        twin = copy.deepcopy(model)
        for p in model.parameters():  # the copy must not read the original's tensors
            p.zero_()
        torch.testing.assert_close(twin(ids.to(device)).logits.cpu(), want, rtol=1e-4, atol=1e-4)
    probe = weakref.ref(twin.model.layers[0].self_attn.q_proj)
    gc.disable()
    try:
        del twin
        assert probe() is None  # freed by reference counting alone
    finally:
        gc.enable()


def test_siblings_are_grouped_only_if_their_input_is_unmodified_between_them():
    """The compiled path caches by tensor identity alone, so discovery must not group layers across an
    in-place change of their input."""
    from modules.fast_layers import _sibling_sets

    class Toy(nn.Module):
        def __init__(self, mutate: bool):
            super().__init__()
            self.a, self.b, self.c, self.mutate = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4), mutate

        def forward(self, x):
            x = x * 1.0
            ya, yb = self.a(x), self.b(x)
            if self.mutate:
                x.mul_(2.0)
            return ya + yb + self.c(x)

    example = {"x": torch.randn(2, 8)}
    assert _sibling_sets(Toy(False), ["a", "b", "c"], example) == [["a", "b", "c"]]
    assert _sibling_sets(Toy(True), ["a", "b", "c"], example) == [["a", "b"]]


class _CountWeightProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Matrix products (out= variants too) that read one of the given parameters: the layers' products,
    not attention's (which differs by device)."""

    def __init__(self, params):
        super().__init__()
        self.ptrs, self.n = {p.untyped_storage().data_ptr() for p in params}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            self.n += any(torch.is_tensor(a) and a.untyped_storage().data_ptr() in self.ptrs for a in args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["layers", "blocks"])
def test_compiled_inference_form_gives_the_same_logits_with_one_product_per_group(device, mix):
    """torch.compile (fullgraph: no graph break) traces the layers' functional paths and the sibling
    cache: the same logits as eager, and the traced graph holds as many weight products as the eager
    model runs (the stacked first product once per group, not once per member; one batched product per
    bundle). mix="layers": row-ID and SVD layers alternate, so groups mix both kinds of member (no
    bundles); "blocks": block 0 is row ID, block 1 column ID, so k/v and gate/up are bundles."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    model = _tiny("llama", device)
    for i, info in enumerate(find_linears(model)):
        replace_module(info, _compressed(info.module, ("rowid", "svd")[i % 2] if mix == "layers" else ("rowid", "colid")[i // 7]))
    report = to_inference_form(model)
    assert len(report["groups"]) == 4
    n_bundled = sum(len(model.get_submodule(g[0]).group.bundle_of) for g in report["groups"])
    assert n_bundled == (0 if mix == "layers" else 8)
    ids = torch.randint(0, 96, (1, 8), device=device)
    traced = []

    def backend(gm, example_inputs):  # inductor, keeping the traced graph to count its products
        traced.append(gm)
        return compile_fx(gm, example_inputs)
    with torch.no_grad():
        counter = _CountWeightProducts(list(model.parameters()))
        with counter:
            want = model(ids).logits
        got, code = run_and_get_code(torch.compile(model, backend=backend, fullgraph=True, dynamic=False), ids)
    torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-4)
    products = [n for n in traced[0].graph.nodes if n.op == "call_function"
                and n.target in (F.linear, torch.mm, torch.addmm, torch.matmul, torch.bmm, torch.baddbmm)]
    assert len(traced) == 1 and len(products) == counter.n > 0
    # the gathers became part of the compiler's own kernels (fused, not called); comment lines quote
    # the traced graph, and on CUDA that quote names aten.index
    src = "\n".join(line for c in code for line in c.splitlines() if not line.lstrip().startswith("#"))
    assert "Original ATen: [aten.index" in "\n".join(code) or "aten.index, " in "\n".join(code)
    assert "torch.ops.aten.index" not in src and "aten.index_select.default(" not in src
    torch._dynamo.reset()
