"""A model traced at many sites: after its first pass, a site's lone output tensor of the
shape it had goes straight into its gathered chunk, or (a variable that is not gathered) into
pool memory queued for writing (``_Capture._put_direct``, no labeling run again). Every value
must equal the model's own, whatever makes a tensor leave that path: a smaller last batch, a
longer sequence, a module called twice in a pass, an in-place op after the hook, bfloat16."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import layerscope
from layerscope.core import StoreOptions
from layerscope.core import direct as direct_module
from layerscope.core.gather import GatherPolicy

from .address_copies import count_address_copies, take_hook_way


@pytest.fixture(autouse=True, params=["c", "python"])
def hook_way(request, monkeypatch):
    """Each test both ways: a torch site's hook taking the common case in C
    (core/_directc.c), and the Python alone, as a build without the C part runs."""
    take_hook_way(request.param, monkeypatch.setattr)
    return request.param


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU(inplace=True)  # changes fc1's output after its hook ran
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class Blocks(nn.Module):
    """12 blocks (4 captured outputs each: gathered); ``shared`` runs twice a pass."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(12))
        self.shared = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(x)
        for block in self.blocks:
            x = block(x)
        return self.shared(x)


def reference(model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Each variable's values per pass, taken by hooks of the test's own."""
    values: dict[str, list[np.ndarray]] = {}
    calls: dict[str, int] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            index = calls.get(name, 0)
            calls[name] = index + 1
            kind = "output" if index == 0 else f"output.call{index}"
            values.setdefault(f"{name}@{kind}", []).append(
                output.float().resolve_neg().numpy().copy())
        return keep

    handles = [module.register_forward_hook(hook(name))
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            for x in inputs:
                calls.clear()
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return values


@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_equal_the_model_on_and_off_the_direct_path(tmp_path, monkeypatch, dtype,
                                                           gathered, hook_way):
    torch.manual_seed(0)
    model = Blocks().to(dtype).eval()
    # batch 4 of 5 positions; then a longer pass, shorter ones, two passes of the longer
    # length into one chunk (the second copied by its address, where the dtype allows), a
    # smaller last batch
    shapes = [(4, 5), (4, 5), (4, 5), (4, 8), (4, 5), (4, 5), (4, 8), (4, 8), (3, 5)]
    inputs = [torch.randn(b, n, 16, dtype=dtype) for b, n in shapes]
    expected = reference(model, inputs)

    direct = []
    short_sites = set()  # the sites whose first call of a pass went the short way

    def counted(original):
        def put(self, *args, **kwargs):
            taken = original(self, *args, **kwargs)
            direct.append(taken)
            if taken:
                short_sites.add(self._key[0])
            return taken
        return put

    monkeypatch.setattr(direct_module.SitePut, "put", counted(direct_module.SitePut.put))
    address_copies = count_address_copies(monkeypatch.setattr)
    path = tmp_path / "t.zarr"
    # chunks of two batches: the shorter passes after the longer one fill new chunks, and
    # later ones the memory of written ones (reused: what it held must not show)
    options = StoreOptions(gathering=GatherPolicy(enabled=gathered, batches=2))
    with layerscope.trace(model, path, options=options), torch.no_grad():
        for x in inputs:
            model(x)

    by_address = address_copies()
    short_sites.update(by_address)
    # the direct way: every block's four outputs and the first call of ``shared``, in each
    # pass after the first but the longer one (the store grows) and the smaller last batch;
    # shorter passes go too
    assert sum(direct) + len(by_address) >= (4 * 12 + 1) * 4
    # by address: the second pass of the longer length, every site (never bfloat16, stored
    # as float32; never a variable that is not gathered)
    blocks = {f"blocks.{i}{part}" for i in range(12) for part in ("", ".fc1", ".act", ".fc2")}
    if gathered and dtype is not torch.bfloat16:
        assert {"root", "shared", *blocks} <= set(by_address), by_address
        # the C hooks took the common case themselves
        assert (len(address_copies.in_c()) > 0) == (hook_way == "c"), address_copies.in_c()
    else:
        assert not by_address
    # every site: ``shared`` too, whose second call in the first pass asked for its way in
    # before that pass had decided whether its variable is gathered
    assert short_sites == {"root", "shared", *blocks}, short_sites
    ds = layerscope.open_trace(path)
    assert ds["blocks.0.fc1@output"].attrs.get("gathered_batches") == (2 if gathered else None)
    assert "shared@output.call1" in ds
    rows = np.cumsum([0] + [b for b, _ in shapes])
    for name, passes in expected.items():
        stored = ds[name].values
        assert stored.shape[0] == rows[-1], name
        for number, value in enumerate(passes):
            got = stored[rows[number]:rows[number + 1]]
            length = value.shape[1]
            np.testing.assert_array_equal(got[:, :length], value, err_msg=f"{name} {number}")
            assert np.isnan(got[:, length:]).all(), name  # a shorter pass: filled


class Failing(nn.Module):
    """Raises once, when told to, half way through the model's blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            self.fail = False
            raise RuntimeError("a pass that fails half way")
        return x


@pytest.mark.parametrize(("failing", "gathered"), [(3, True), (4, True), (3, False)])
def test_a_failed_pass_after_direct_puts_leaves_nothing_and_the_next_pass_is_whole(
        tmp_path, monkeypatch, failing, gathered):
    """The writer remembers the chunk each variable's last batch went to (core/direct.py); a
    pass that fails after half its sites went there is discarded, and the pass that follows
    takes the same rows again: its values, never the failed pass's, are stored."""
    address_copies = count_address_copies(monkeypatch.setattr)
    torch.manual_seed(0)
    model = Blocks().eval()
    model.blocks.insert(6, Failing())
    inputs = [torch.randn(4, 5, 16) for _ in range(6)]
    kept = [x for number, x in enumerate(inputs) if number != failing]
    expected = reference(model, kept)
    path = tmp_path / "t.zarr"
    options = StoreOptions(gathering=GatherPolicy(enabled=gathered, batches=4))
    with layerscope.trace(model, path, options=options), torch.no_grad():
        for number, x in enumerate(inputs):
            model.blocks[6].fail = number == failing
            before = len(address_copies())
            try:
                model(x)
            except RuntimeError:
                assert number == failing
                in_failing_pass = len(address_copies()) - before
    # copied by address into the rows the failed pass claimed: rows 12-16 of the first chunk
    # (failing 3), or rows 0-4 of the second, opened at the end of the batch before (4)
    assert (in_failing_pass > 0) == gathered, in_failing_pass
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 5
    assert ds["blocks.0.fc1@output"].attrs.get("gathered_batches") == (4 if gathered else None)
    for name, passes in expected.items():
        np.testing.assert_array_equal(ds[name].values, np.concatenate(passes), err_msg=name)


def test_a_new_groups_first_batch_goes_the_direct_way_and_every_value_is_kept(
        tmp_path, monkeypatch):
    """A group's chunks are opened at the end of the batch that closed the ones before
    them (GatheredWrites._open_next), so that the next group's first batch is copied by
    address too: after the first pass no put goes the general way, across three group
    ends; a trace that ends right after such a batch end leaves its opened chunks unwritten
    (no file, no row past the last batch); every value is the model's own."""
    general = []
    put = direct_module.SitePut.put

    def counted(self, *args):
        if self._key not in self._calls:  # a site's second call in a pass is refused at once
            general.append(self._key)
        return put(self, *args)

    monkeypatch.setattr(direct_module.SitePut, "put", counted)
    torch.manual_seed(0)
    model = Blocks().eval()
    inputs = [torch.randn(4, 5, 16) for _ in range(8)]  # 4 groups of 2 batches
    expected = reference(model, inputs)
    path = tmp_path / "t.zarr"
    options = StoreOptions(gathering=GatherPolicy(batches=2))
    with layerscope.trace(model, path, options=options), torch.no_grad():
        for number, x in enumerate(inputs):
            if number == 2:
                general.clear()  # passes 0 and 1 label every site and fill the first group
            model(x)
    assert general == [], f"{len(general)} general puts, e.g. {general[:3]}"
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 8 and ds.sizes["batch"] == 32
    assert ds["blocks.0.fc1@output"].attrs.get("gathered_batches") == 2
    # the chunks opened after the last group (rows 32-40) were never written
    assert sorted(f.name for f in (path / "blocks.0.fc1@output").iterdir()
                  if f.name.startswith("c.")) == ["c.0.0.0", "c.1.0.0", "c.2.0.0", "c.3.0.0"]
    for name, passes in expected.items():
        np.testing.assert_array_equal(ds[name].values, np.concatenate(passes), err_msg=name)


class Transposed(nn.Module):
    """Hands on a view of its input: the same shape (square), other strides."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class Expanded(nn.Module):
    """Hands on a view that repeats one token (a stride of 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].expand(x.shape)


def trace_seeing_puts_by_address(tmp_path, monkeypatch, model, inputs, seen):
    """Trace ``model`` over ``inputs`` (chunks of 4 batches), ``seen(site, taken)`` told of
    every ``SitePut.put_raw`` and, at the end of each pass, of each copy the C hooks made
    in it; the store's path."""
    copies = count_address_copies(monkeypatch.setattr, seen)
    path = tmp_path / "t.zarr"
    options = StoreOptions(gathering=GatherPolicy(batches=4))
    with layerscope.trace(model, path, options=options), torch.no_grad():
        for x in inputs:
            before = Counter(copies.in_c())
            model(x)
            for site, count in (Counter(copies.in_c()) - before).items():
                for _ in range(count):
                    seen(site, True)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_only_a_contiguous_tensor_is_copied_by_its_address(tmp_path, monkeypatch, dtype):
    """The short way copies a tensor's memory as it lies (``SitePut.put_raw``) only where it
    lies in order, in the bytes it is stored as (bfloat16 is stored as float32: never); a
    view with other strides goes the array way, and all store the model's values."""
    torch.manual_seed(0)
    model = Blocks().to(dtype).eval()
    model.blocks.insert(3, Transposed())
    model.blocks.insert(7, Expanded())
    inputs = [torch.randn(4, 16, 16, dtype=dtype) for _ in range(8)]  # tokens = width
    expected = reference(model, inputs)
    raw: dict[str, int] = {}

    def count(site, taken):
        raw[site] = raw.get(site, 0) + taken

    path = trace_seeing_puts_by_address(tmp_path, monkeypatch, model, inputs, count)
    assert raw.get("blocks.3", 0) == raw.get("blocks.7", 0) == 0, raw
    if dtype == torch.bfloat16:
        assert not any(raw.values()), raw
    else:  # the others: by address
        assert raw["blocks.2.fc1"] >= 2 and raw["blocks.8"] >= 2, raw
    ds = layerscope.open_trace(path)
    assert ds["blocks.3@output"].attrs.get("gathered_batches") == 4
    for name, passes in expected.items():
        np.testing.assert_array_equal(ds[name].values, np.concatenate(passes), err_msg=name)


class Changing(nn.Module):
    """Hands on a tensor of the same shape each pass, lying in memory as ``ways`` says: in
    order (a copy of its own), transposed (square), negated by a flag on a view of its input
    (``is_neg``: the bytes are its input's), or one token repeated (a stride of 0)."""

    def __init__(self, ways: list[str]) -> None:
        super().__init__()
        self.ways, self.calls = ways, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        way = self.ways[self.calls % len(self.ways)]
        self.calls += 1
        if way == "transposed":
            return x.transpose(1, 2)
        if way == "negated":
            return torch._neg_view(x)
        if way == "expanded":
            return x[:, :1].expand(x.shape)
        return x * 2


def test_a_site_that_went_by_address_is_checked_again_at_each_pass(tmp_path, monkeypatch):
    """Once a site's output went by address, its hook tries that way first, its checks
    inline (``_Capture._output_hook``): a later output lying otherwise in memory (a view
    with other strides, a negated view, a repeated token) must not be copied as it lies,
    and the way is taken again once outputs lie in order; a tensor the inline way offered
    in vain (a last pass of fewer tokens) is not offered again; every value is the model's."""
    torch.manual_seed(0)
    model = Blocks().eval()
    ways = ["in order", "in order", "in order", "transposed", "in order", "negated",
            "in order", "expanded", "in order", "in order", "in order"]
    model.blocks.insert(4, Changing(ways))
    # tokens = width: transposes keep shape; the last pass has fewer tokens
    inputs = [torch.randn(4, 16 if number < 10 else 12, 16) for number in range(len(ways))]
    expected = reference(model, inputs)
    model.blocks[4].calls = 0
    taken: list[tuple[int, bool]] = []  # (pass, copied by address) of the changing site

    def note(site, took):
        if site == "blocks.4":
            taken.append((model.blocks[4].calls - 1, took))

    path = trace_seeing_puts_by_address(tmp_path, monkeypatch, model, inputs, note)
    by_address = {number for number, took in taken if took}
    assert not by_address & {3, 5, 7}, taken  # never a view that lies otherwise
    assert {2, 4, 6, 8, 9} <= by_address, taken  # in order again: by address again
    assert [took for number, took in taken if number == 10] == [False], taken  # once
    ds = layerscope.open_trace(path)
    assert ds["blocks.4@output"].attrs.get("gathered_batches") == 4
    for name, passes in expected.items():
        stored = ds[name].values
        np.testing.assert_array_equal(stored[:40], np.concatenate(passes[:10]), err_msg=name)
        np.testing.assert_array_equal(stored[40:, :12], passes[10], err_msg=name)
        assert np.isnan(stored[40:, 12:]).all(), name  # a shorter pass: filled
