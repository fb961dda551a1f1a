"""torchgraft.distributed on CPU with gloo: DDP / FSDP2 parity with one process, no_sync under
accumulation, activation checkpointing, LoRA-style frozen weights, meta-device init, and DCP
checkpoints resharded 2 -> 1 and 1 -> 2.

One 2-process launch (torch.multiprocessing.spawn) runs every multi-rank check; the single-process
reference and the 2 -> 1 resume run in the pytest process.
"""
from __future__ import annotations

import gc
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from torchgraft.distributed import (
    DistributedStatefulSampler, all_reduce_mean, apply_activation_checkpointing, cleanup, export_safetensors,
    find_blocks, grad_sync, init_distributed, load_sharded, local_numel, parallelize, read_extra,
    save_sharded, strategy_of, torchrun_command, unwrap)
from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol
from conftest import assert_same_run

VOCAB, DIM, HEADS, LAYERS, T = 32, 16, 2, 3, 8
N_SEQ, GLOBAL_BS, STEPS, SPLIT = 48, 8, 6, 3   # resume after SPLIT of STEPS steps
LR = 1e-2


# ------------------------------------------------------------------------------------------
# a tiny GPT-style model (until the zoo exists; the test needs nothing more)
# ------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T_, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)                              # (B, T, C) each
        q, k, v = (t.view(B, T_, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T_, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(DIM, HEADS) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.tok_emb.weight                       # tied, like GPT-2

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)                                            # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))                                # (B, T, V)


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update (as PEFT/LoRA does)."""

    def __init__(self, base: nn.Linear, r: int = 2) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def make_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    m = TinyGPT()
    m.init_weights()
    return m


def make_lora_model() -> TinyGPT:
    m = make_model()
    for p in m.parameters():
        p.requires_grad_(False)
    for blk in m.blocks:
        blk.attn.qkv = LoRALinear(blk.attn.qkv)
        blk.attn.proj = LoRALinear(blk.attn.proj)
    return m


def dataset() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (N_SEQ, T + 1), generator=g)


def lm_loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: it has state to checkpoint, and weights move linearly in the gradients, so
    runs that sum gradients in another order stay within a derivable bound (conftest.assert_same_run)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9,
                           weight_decay=0.1)


def train(model, opt, sampler, data, steps, *, world=1, accum=1, on_micro=None) -> list[float]:
    """`steps` optimizer steps on this rank's share of each global batch; global mean losses."""
    it = iter(sampler)
    per_rank = GLOBAL_BS // world
    losses = []
    for _ in range(steps):
        batch = data[[next(it) for _ in range(per_rank)]]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j, micro in enumerate(batch.chunk(accum)):
            with grad_sync(model, sync=j == accum - 1):
                loss = lm_loss(model, micro) / accum
                loss.backward()
            if on_micro is not None:
                on_micro(j)
            total += loss.item()
        opt.step()
        losses.append(all_reduce_mean(total))
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> full parameter tensor (gathering FSDP2 shards)."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        t = p.detach()
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
    return out


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return out


# ------------------------------------------------------------------------------------------
# the single-process reference (computed once per session)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of STEPS steps in one process, the final weights, and a 1-process DCP checkpoint
    written after SPLIT steps."""
    root = tmp_path_factory.mktemp("dist")
    data = dataset()
    model = make_model()
    opt = make_optimizer(model)
    sampler = DistributedStatefulSampler(N_SEQ, num_replicas=1, rank=0, seed=7)
    losses = train(model, opt, sampler, data, SPLIT)
    save_sharded(root / "ckpt_1proc", model, opt, extra={"step": SPLIT, "sampler": sampler.state_dict()})
    losses += train(model, opt, sampler, data, STEPS - SPLIT)
    export_safetensors(model, root / "ref.safetensors")
    return {"root": root, "losses": losses}


# ------------------------------------------------------------------------------------------
# the 2-process worker: every multi-rank check in one process-group launch
# ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ranks sum gradients in another order: the longest sums are the MLP's 4 * DIM inputs and the
# GLOBAL_BS * T token rows of a weight gradient; LAYERS blocks and the head; forward and backward
TOL = 2 * tolerance(reduction=max(4 * DIM, GLOBAL_BS * T), depth=LAYERS + 1)


def _close(a, b, what, tol=TOL, scale=None):
    assert_close_computed(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          tol, scale=scale, msg=what)


def _worker(rank: int, world: int, port: int, root: str, ref_losses: list[float]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type) == (rank, world, "cpu")
    data = dataset()
    ref_w = load_file(os.path.join(root, "ref.safetensors"))

    def sampler():
        return DistributedStatefulSampler(N_SEQ, num_replicas=world, rank=rank, seed=7)

    # -- DDP with 2 micro-batches per rank: equal losses; all-reduce only on the last micro-batch
    model = parallelize(make_model(), "ddp")
    assert strategy_of(model) == "ddp"
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    seen = []
    losses = train(model, make_optimizer(model), sampler(), data, SPLIT, world=world, accum=2,
                   on_micro=lambda j: seen.append((j, len(calls))))
    _close(losses, ref_losses[:SPLIT], "DDP + accumulation losses")
    first = [n for j, n in seen if j == 0]
    last = [n for j, n in seen if j == 1]
    assert all(a == b for a, b in zip([0] + last[:-1], first)), f"no_sync skipped nothing: {seen}"
    assert all(b > a for a, b in zip(first, last)), f"no all-reduce on the last micro-batch: {seen}"

    # -- FSDP2 with activation checkpointing every 2nd block: equal losses, save at SPLIT
    model = parallelize(make_model(), "fsdp", activation_checkpointing=2)
    assert strategy_of(model) == "fsdp"
    assert local_numel(model) < sum(p.numel() for p in make_model().parameters()) * 0.6
    opt = make_optimizer(model)
    s = sampler()
    losses = train(model, opt, s, data, SPLIT, world=world)
    _close(losses, ref_losses[:SPLIT], "FSDP losses")
    save_sharded(os.path.join(root, "ckpt_2proc"), model, opt,
                 extra={"step": SPLIT, "sampler": s.state_dict()})
    losses = train(model, opt, s, data, STEPS - SPLIT, world=world)
    _close(losses, ref_losses[SPLIT:], "FSDP losses after the checkpoint")
    out = export_safetensors(model, os.path.join(root, "fsdp_final.safetensors"))
    assert (out is not None) == (rank == 0)
    if rank == 0:
        got = load_file(str(out))
        assert set(got) == set(ref_w)
        assert_same_run(got, ref_w, make_model().state_dict(), TOL)

    # -- activation checkpointing gives the same gradients (FSDP, every block)
    batch = data[:GLOBAL_BS][rank::world]
    grads = []
    for ac in ("none", "full"):
        m = parallelize(make_model(), "fsdp", activation_checkpointing=ac)
        lm_loss(m, batch).backward()
        grads.append(full_grads(m))
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 0
    scale = max(g.abs().max().item() for g in grads[0].values())
    for k in grads[0]:
        _close(grads[1][k], grads[0][k], f"AC grad {k}", scale=scale)

    # -- bf16 mixed precision: fp32 sharded master weights, loss close to fp32
    m = parallelize(make_model(), "fsdp", mixed_precision="bf16")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    loss = all_reduce_mean(lm_loss(m, batch).item())
    ref_loss = all_reduce_mean(lm_loss(make_model(), batch).item())
    assert abs(loss - ref_loss) <= tolerance(4 * DIM, LAYERS + 1, torch.bfloat16) * abs(ref_loss), (loss, ref_loss)

    # -- LoRA-style frozen base + trainable adapters: everything sharded, grads only for adapters
    m = make_lora_model()
    n_total = sum(p.numel() for p in m.parameters())
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    m = parallelize(m, "fsdp")
    opt = make_optimizer(m)
    lm_loss(m, batch).backward()
    opt.step()
    grad_local = sum(p.grad.to_local().numel() for p in m.parameters() if p.grad is not None)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    assert local_numel(m) <= math.ceil(n_total / world) + 64, (local_numel(m), n_total)
    assert grad_local <= math.ceil(n_train / world) + 16, (grad_local, n_train)
    assert sum(len(st) for st in opt.state.values()) > 0

    # -- meta-device build -> shard -> materialise: no rank holds a full weight
    with torch.device("meta"):
        meta = TinyGPT()
    m = parallelize(meta, "fsdp")
    for name, p in m.named_parameters():
        assert not p.is_meta, name
        assert p.to_local().numel() <= math.ceil(p.shape[0] / world) * math.prod(p.shape[1:]), name
    full = full_params(m)
    assert torch.all(full["blocks.0.attn.qkv.bias"] == 0)
    w = full["blocks.0.mlp.0.weight"]
    assert not torch.equal(w[: w.shape[0] // 2], w[w.shape[0] // 2:]), "ranks initialised the same values"
    std = w.std().item()
    assert 0.015 < std < 0.025, std
    loss = lm_loss(m, batch)
    loss.backward()
    assert math.isfinite(loss.item())

    # -- a zoo model (Llama: RoPE buffers, GQA, SwiGLU): FSDP + AC gradients = one-process gradients
    from torchgraft.models.registry import build
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    ref = build("llama-tiny")
    F.cross_entropy(ref(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    torch.manual_seed(0)
    m = parallelize(build("llama-tiny"), "fsdp", activation_checkpointing="full")
    mine = ids[rank::world]
    F.cross_entropy(m(mine[:, :-1]).flatten(0, 1), mine[:, 1:].flatten()).backward()
    got = full_grads(m)
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for name, p in ref.named_parameters():
        _close(got[name], p.grad, f"llama-tiny grad {name}", 2 * transformer_tol(ref.config, 15), scale)
    meta_built = parallelize(build("llama-tiny", device="meta"), "fsdp")
    for name, buf in ref.named_buffers():  # the same computation on CPU after meta init
        assert torch.equal(dict(meta_built.named_buffers())[name], buf), f"llama-tiny buffer {name}"

    # -- resume 1 -> 2: the 1-process checkpoint into FSDP on 2 ranks
    for strategy in ("fsdp", "ddp"):
        m = parallelize(make_model(seed=99), strategy)
        opt = make_optimizer(m)
        extra = load_sharded(os.path.join(root, "ckpt_1proc"), m, opt)
        s = sampler()
        s.load_state_dict(extra["sampler"])
        losses = train(m, opt, s, data, STEPS - SPLIT, world=world)
        _close(losses, ref_losses[SPLIT:], f"resume 1 -> 2 ({strategy})")

    # -- resume 2 -> 2 (another strategy): the FSDP checkpoint into DDP
    m = parallelize(make_model(seed=99), "ddp")
    opt = make_optimizer(m)
    extra = load_sharded(os.path.join(root, "ckpt_2proc"), m, opt)
    s = sampler()
    s.load_state_dict(extra["sampler"])
    losses = train(m, opt, s, data, STEPS - SPLIT, world=world)
    _close(losses, ref_losses[SPLIT:], "resume 2 -> 2 (fsdp -> ddp)")

    del model, m, opt
    gc.collect()  # drop DDP/FSDP objects (and their communication hooks) before the group goes
    cleanup()


def test_two_processes_match_one_and_reshard(reference):
    """DDP/FSDP2 parity, no_sync, AC, bf16, LoRA, meta init, DCP 1->2 and 2->2, on 2 gloo ranks;
    then the 2-process checkpoint resumed in this single process (2 -> 1)."""
    root, ref_losses = reference["root"], reference["losses"]
    mp.spawn(_worker, args=(2, _free_port(), str(root), ref_losses), nprocs=2, join=True)

    # -- resume 2 -> 1: the FSDP checkpoint into a plain model in this (non-distributed) process
    data = dataset()
    model = make_model(seed=99)
    opt = make_optimizer(model)
    extra = load_sharded(root / "ckpt_2proc", model, opt)
    assert extra["step"] == SPLIT
    sampler = DistributedStatefulSampler(N_SEQ, num_replicas=1, rank=0, seed=7)
    sampler.load_state_dict(extra["sampler"])
    losses = train(model, opt, sampler, data, STEPS - SPLIT)
    _close(losses, ref_losses[SPLIT:], "resume 2 -> 1")
    ref_w = load_file(str(root / "ref.safetensors"))
    assert_same_run(model.state_dict(), ref_w, make_model().state_dict(), TOL)
    assert read_extra(root / "ckpt_2proc")["sampler"]["consumed"] == SPLIT * GLOBAL_BS


# ------------------------------------------------------------------------------------------
# single-process checks
# ------------------------------------------------------------------------------------------

def test_activation_checkpointing_same_gradients_single_process():
    data = dataset()[:GLOBAL_BS]
    grads = []
    for ac in ("none", "full", 2):
        m = make_model()
        names = apply_activation_checkpointing(m, ac)
        assert len(names) == {"none": 0, "full": LAYERS, 2: 2}[ac]
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in make_model().named_parameters()]
        lm_loss(m, data).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    scale = max(g.abs().max().item() for g in grads[0].values())
    for g in grads[1:]:
        for k in grads[0]:
            _close(g[k], grads[0][k], f"AC grad {k}", scale=scale)  # recomputed forward


def test_find_blocks():
    m = make_model()
    assert [n for n, _ in find_blocks(m)] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in find_blocks(m, block_types=[Attention])] == [f"blocks.{i}.attn" for i in range(3)]
    assert [n for n, _ in find_blocks(m, pattern=r"blocks\.[02]")] == ["blocks.0", "blocks.2"]

    class Stages(nn.Module):  # ResNet-style residual stages
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3)
            self.layer1 = nn.Sequential(nn.Conv2d(2, 2, 3))
            self.layer2 = nn.Sequential(nn.Conv2d(2, 2, 3))
            self.fc = nn.Linear(2, 2)

    assert [n for n, _ in find_blocks(Stages())] == ["layer1", "layer2"]
    assert find_blocks(nn.Linear(2, 2)) == []
    with pytest.raises(ConfigError, match="matches no submodule"):
        find_blocks(m, pattern="layers\\.\\d+")


@pytest.mark.parametrize("name, expected", [
    ("gpt-tiny", ["blocks.0", "blocks.1"]), ("llama-tiny", ["blocks.0", "blocks.1"]),
    # ResNet declares its residual blocks (ModelParts.blocks); stages are the undeclared fallback (above)
    ("resnet18", [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]), ("bert-tiny", ["blocks.0", "blocks.1"])])
def test_find_blocks_in_zoo_models(name, expected):
    from torchgraft.models.registry import build

    assert [n for n, _ in find_blocks(build(name, device="meta"))] == expected


def test_parallelize_rejects_bad_options():
    with pytest.raises(ConfigError, match="did you mean 'fsdp'"):
        parallelize(make_model(), "fsdpp")
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        parallelize(make_model(), "none", activation_checkpointing="sometimes")
    with pytest.raises(ConfigError, match="trainer.precision"):
        parallelize(make_model(), "ddp", mixed_precision="bf16")
    with pytest.raises(ConfigError, match="mixed_precision"):
        parallelize(make_model(), "fsdp", mixed_precision="int3")
    with pytest.raises(ConfigError, match="repeated blocks"):
        parallelize(nn.Linear(2, 2), "none", activation_checkpointing="full")


def test_parallelize_none_materialises_meta_model():
    with torch.device("meta"):
        m = TinyGPT()
    m = parallelize(m, "none")
    assert not any(p.is_meta for p in m.parameters())
    assert torch.all(m.blocks[1].mlp[0].bias == 0)
    assert 0.015 < m.blocks[1].mlp[0].weight.std().item() < 0.025


def test_sampler_shards_one_global_order_and_resumes_exactly():
    n, world, per_rank = 50, 2, 3
    single = list(DistributedStatefulSampler(n, num_replicas=1, rank=0, seed=3))
    ranks = [list(DistributedStatefulSampler(n, num_replicas=world, rank=r, seed=3)) for r in range(world)]
    # step t's global batch = union of the ranks' t-th batches = the single-process t-th batch
    for t in range(len(ranks[0]) // per_rank):
        got = sorted(i for r in range(world) for i in ranks[r][t * per_rank:(t + 1) * per_rank])
        assert got == sorted(single[t * per_rank * world:(t + 1) * per_rank * world])
    assert sorted(ranks[0] + ranks[1]) == list(range(n))        # 50 divides evenly: every sample once
    assert len(DistributedStatefulSampler(51, num_replicas=2, rank=1)) == 25            # drop_last
    assert len(DistributedStatefulSampler(51, num_replicas=2, rank=1, drop_last=False)) == 26

    # resume mid-epoch on each rank: exactly the remaining indices, no replay, no skip
    s = DistributedStatefulSampler(n, num_replicas=world, rank=1, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["consumed"] == 7 * world
    s2 = DistributedStatefulSampler(n, num_replicas=world, rank=1, seed=3)
    s2.load_state_dict(state)
    assert first + list(s2) == ranks[1]
    # next epoch: a new order
    assert list(s2) != ranks[1] and sorted(list(DistributedStatefulSampler(n, num_replicas=1, rank=0, seed=3))) \
        == list(range(n))

    # resume with another world size (2 -> 1): continues the same global order
    one = DistributedStatefulSampler(n, num_replicas=1, rank=0, seed=3)
    one.load_state_dict(state)
    assert list(one) == single[7 * world:]
    with pytest.raises(CheckpointError, match="evenly"):
        DistributedStatefulSampler(n, num_replicas=4, rank=0, seed=3).load_state_dict({**state, "consumed": 6})
    with pytest.raises(CheckpointError, match="same data"):
        DistributedStatefulSampler(n + 1, num_replicas=2, rank=0, seed=3).load_state_dict(state)


def test_load_sharded_rejects_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a torchgraft sharded checkpoint"):
        load_sharded(tmp_path, make_model())
    (tmp_path / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n.")
    (tmp_path / "torchgraft_dcp.json").write_text('{"has_optimizer": false}')
    with pytest.raises(CheckpointError, match="os.system"):
        load_sharded(tmp_path, make_model())


def test_init_distributed_without_torchrun_is_a_noop(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed("cpu")


def test_torchrun_command():
    cmd = torchrun_command(2, ["train", "cfg.yaml", "distributed.strategy=fsdp"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "torchgraft", "train", "cfg.yaml", "distributed.strategy=fsdp"]
    with pytest.raises(ConfigError, match="--nproc"):
        torchrun_command(0, ["train"])
