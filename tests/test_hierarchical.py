"""Hierarchical D-Lion (issue 12) against an oracle written here: node mean in local-rank order, then D-Lion
across nodes (dlion_update_ref with one voter per node), bit for bit; gloo, 4 ranks (2 x 2) and 8 ranks (2 x 4)."""

import pytest
import torch
import torch.distributed as dist
from _dist import spawn

from distlion_ds import DistributedLion
from distlion_ds.kernels.lion import aggregate_bits
from distlion_ds.optim.lion import dlion_update_ref

SHAPES = [(37, 5), (64,), (3, 4, 7), (1,), (1000,)]
NO_GRAD_ON_RANK0 = 2  # parameter whose gradient is None on rank 0
LR, BETAS, WD = 0.01, (0.9, 0.99), 0.1


def _grad(step, rank, i, shape):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + i)
    x = torch.randn(shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.1] = 0.0  # exact zeros: the zero rule is exercised
    if i == 3:
        x.zero_()  # every vote of this parameter is a tie
    return x


def _grad_or_none(step, rank, i):
    return None if (rank == 0 and i == NO_GRAD_ON_RANK0) else _grad(step, rank, i, SHAPES[i])


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _node_mean(grads, shape):
    """The documented order: (((g_0 + g_1) + g_2) + ...) / L in fp32, None counting as zeros."""
    total = torch.zeros(shape)
    for g in grads:
        total = total + (torch.zeros(shape) if g is None else g.float())
    return total / len(grads)


def _set_grads(params, step, rank):
    for i, p in enumerate(params):
        p.grad = _grad_or_none(step, rank, i)


def _check_oracle(rank, world, nodes, aggregation, **kwargs):
    """3 steps of DistributedLion(**kwargs) against node mean + D-Lion over len(nodes) voters, bit for bit."""
    params = _params()
    opt = DistributedLion(params, lr=LR, betas=BETAS, weight_decay=WD, aggregation=aggregation, bucket_numel=512,
                          check_replicas_every=1, rounding_seed=None, **kwargs)
    node = next(n for n, g in enumerate(nodes) if rank in g)
    ref_p = [p.detach().clone() for p in params]
    ref_m = [[torch.zeros(s) for _ in nodes] for s in SHAPES]
    for step in range(1, 4):
        _set_grads(params, step, rank)
        opt.step()
        for i, s in enumerate(SHAPES):
            means = [_node_mean([_grad_or_none(step, r, i) for r in g], s) for g in nodes]
            ref_p[i], ref_m[i] = dlion_update_ref(ref_p[i], means, ref_m[i], LR, BETAS, WD, step, aggregation)
            torch.testing.assert_close(params[i].detach(), ref_p[i], atol=0, rtol=0)
    # The momentum this rank holds is its slice of its node's momentum, and nothing else.
    ranges = opt._hier._ranges
    assert ranges and set(opt.state) == set(ranges)
    for i, p in enumerate(params):
        if p in ranges:
            lo, hi = ranges[p]
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref_m[i][node].reshape(-1)[lo:hi], atol=0, rtol=0)
    L = len(nodes[0])
    held = sum(b.exp_avg.numel() for b in opt._buckets)
    assert held * L == sum(b.numel for b in opt._buckets)  # exactly 1/L of the padded flat momentum
    assert len(opt._buckets) == 2
    stats = opt.comm_stats()
    assert stats["steps"] == 3 and stats["world_size"] == world and stats["intra_node_size"] == L
    assert stats["num_nodes"] == len(nodes)
    assert stats["bytes_sent"] == stats["inter_node_bytes_sent"] + stats["intra_node_bytes_sent"]
    # Intra-node wire, exact: fp32 chunks (L-1)/L of the bucket, then (L-1) * (nbits * S/8 + 1 flag byte).
    nbits = aggregate_bits(aggregation, len(nodes))
    intra = sum((L - 1) * (4 * b.numel // L + nbits * b.shard // 8 + 1) for b in opt._buckets)
    assert stats["intra_node_bytes_sent"] == 3 * intra


def _check_l1_equals_flat(rank, world):
    """Hierarchical machinery with nodes of one rank == flat D-Lion, bit for bit (incl. bf16 stochastic rounding)."""
    shapes = SHAPES + [(333,)]
    for aggregation in ("mavo", "avg"):
        runs = []
        for kwargs in ({}, {"node_groups": [[r] for r in range(world)]}):
            g = torch.Generator().manual_seed(5)
            params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
            params[-1].data = params[-1].data.bfloat16()
            params[0].data = params[0].data.t().contiguous().t()  # non-contiguous: applied on a copy, written back
            assert not params[0].is_contiguous()
            opt = DistributedLion(params, lr=LR, betas=BETAS, weight_decay=WD, aggregation=aggregation,
                                  bucket_numel=512, **kwargs)
            for step in range(1, 4):
                for i, p in enumerate(params):
                    p.grad = (_grad_or_none(step, rank, i) if i < len(SHAPES)
                              else _grad(step, rank, i, shapes[i]).bfloat16())
                opt.step()
            runs.append((params, opt))
        (flat_p, flat_opt), (hier_p, hier_opt) = runs
        assert hier_opt._hier is not None and flat_opt._hier is None and hier_opt.intra_node_size == 1
        for a, b in zip(flat_p, hier_p, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
            torch.testing.assert_close(flat_opt.state[a]["exp_avg"].reshape(-1), hier_opt.state[b]["exp_avg"],
                                       atol=0, rtol=0)
        fs, hs = flat_opt.comm_stats(), hier_opt.comm_stats()
        assert fs["inter_node_bytes_sent"] == hs["inter_node_bytes_sent"] == fs["bytes_sent"]
        assert fs["intra_node_bytes_sent"] == 0 and fs["intra_node_size"] == 1


def _check_bytes_formula(rank, world, L):
    """Inter-node bytes per rank within 2 % of (1 + b)(M-1)/M / L bits per parameter per step (>= 1M params)."""
    M = world // L
    for aggregation in ("mavo", "avg"):
        big = [torch.nn.Parameter(torch.zeros(1 << 20)), torch.nn.Parameter(torch.zeros(513, 77))]
        opt = DistributedLion(big, lr=1e-3, aggregation=aggregation, intra_node_size=L)
        for p in big:
            p.grad = torch.randn(p.shape)
        opt.step()
        stats = opt.comm_stats()
        b = aggregate_bits(aggregation, M)
        bits = 8 * stats["inter_node_bytes_sent"] / stats["params"]
        target = (1 + b) * (M - 1) / M / L
        assert abs(bits / target - 1) < 0.02, (aggregation, bits, target)
        intra_bits = 8 * stats["intra_node_bytes_sent"] / stats["params"]
        assert abs(intra_bits / ((32 + b) * (L - 1) / L) - 1) < 0.02, (aggregation, intra_bits)
        held = sum(m["exp_avg"].numel() for m in opt.state.values())
        assert abs(held * L / stats["params"] - 1) < 0.01  # momentum per rank: 1/L of flat (+- padding)


def _check_resume_and_skip(rank, world, L):
    def run(opt, params, steps):
        for step in steps:
            _set_grads(params, step, rank)
            opt.step()

    make = dict(lr=LR, betas=BETAS, weight_decay=WD, aggregation="mavo", bucket_numel=512, intra_node_size=L)
    p_full = _params()
    full = DistributedLion(p_full, **make)
    run(full, p_full, range(1, 5))
    p_a = _params()
    opt_a = DistributedLion(p_a, **make)
    run(opt_a, p_a, range(1, 3))
    state = opt_a.state_dict()
    assert state["hierarchical"]["intra_node_size"] == L and state["hierarchical"]["num_nodes"] == world // L
    held = sum(v["exp_avg"].numel() for v in state["state"].values())
    assert held * L <= sum(p.numel() for p in p_a) + 8 * L * len(SHAPES)
    p_b = [torch.nn.Parameter(p.detach().clone()) for p in p_a]
    opt_b = DistributedLion(p_b, **make)
    opt_b.load_state_dict(state)
    run(opt_b, p_b, range(3, 5))
    for a, b in zip(p_full, p_b, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
    for a, b in zip(p_full, p_b, strict=True):
        if a in full.state:
            torch.testing.assert_close(full.state[a]["exp_avg"], opt_b.state[b]["exp_avg"], atol=0, rtol=0)
    # Another layout at load is refused, naming both; so are flat <-> hierarchical checkpoints.
    other = DistributedLion(_params(), **{**make, "intra_node_size": world})
    with pytest.raises(ValueError, match=rf"intra_node_size={L} x {world // L} node.*intra_node_size={world} x 1"):
        other.load_state_dict(state)
    flat = DistributedLion(_params(), **{**make, "intra_node_size": 1})
    with pytest.raises(ValueError, match="hierarchical D-Lion .*intra_node_size=1"):
        flat.load_state_dict(state)
    with pytest.raises(ValueError, match="saved by flat D-Lion"):
        opt_b.load_state_dict(full_flat_state(rank))
    # DeepSpeed's order at load: DP rank 0's state into every rank, then each rank's own file: still bit-exact.
    states = [None] * world
    dist.all_gather_object(states, state)
    p_c = [torch.nn.Parameter(p.detach().clone()) for p in p_a]
    opt_c = DistributedLion(p_c, **make)
    opt_c.load_state_dict(states[0])
    opt_c.load_state_dict(state)
    run(opt_c, p_c, range(3, 5))
    for a, c in zip(p_full, p_c, strict=True):
        torch.testing.assert_close(a.detach(), c.detach(), atol=0, rtol=0)
    # Ranks left with another rank's shard: every rank refuses the next step, before any vote.
    p_d = [torch.nn.Parameter(p.detach().clone()) for p in p_a]
    opt_d = DistributedLion(p_d, **make)
    opt_d.load_state_dict(states[0])
    _set_grads(p_d, 3, rank)
    with pytest.raises(ValueError, match="momentum shard loaded is this rank's own"):
        opt_d.step()
    # A NaN in one rank's gradient skips the step on every rank of every node: p and m untouched.
    before_p = [p.detach().clone() for p in p_b]
    before_m = {p: opt_b.state[p]["exp_avg"].clone() for p in opt_b.state}
    _set_grads(p_b, 5, rank)
    if rank == world - 1:
        p_b[0].grad[3, 1] = float("nan")
    opt_b.step()
    for p, bp in zip(p_b, before_p, strict=True):
        torch.testing.assert_close(p.detach(), bp, atol=0, rtol=0)
    for p, m in before_m.items():
        torch.testing.assert_close(opt_b.state[p]["exp_avg"], m, atol=0, rtol=0)
    assert opt_b.comm_stats()["skipped_steps"] == 1 and opt_b.param_groups[0]["step"] == 4
    opt_b.raise_on_nonfinite = True
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt_b.step()
    opt_b.raise_on_nonfinite = False
    _set_grads(p_b, 5, rank)  # the next finite step applies on every rank (replica check every step)
    opt_b.check_replicas_every = 1
    opt_b.step()
    assert opt_b.param_groups[0]["step"] == 5


def full_flat_state(rank):
    params = _params()
    opt = DistributedLion(params, lr=LR, bucket_numel=512)
    _set_grads(params, 1, rank)
    opt.step()
    return opt.state_dict()


def _check_bad_groupings(rank, world):
    params = _params()
    cases = [
        (dict(intra_node_size=3), "intra_node_size=3 does not divide the data-parallel size 4"),
        (dict(node_groups=[[0, 1], [1, 2, 3]]), "rank 1 is in group 0 and in group 1"),
        (dict(node_groups=[[0, 1], [2]]), r"ranks \[3\] .* are in no group"),
        (dict(node_groups=[[0], [1, 2, 3]]), "nodes of different sizes"),
        (dict(node_groups=[[0, 1], [2, 7]]), "names rank 7"),
        (dict(intra_node_size=0), "intra_node_size"),
        (dict(intra_node_size=4, node_groups=[[0, 1], [2, 3]]), "contradicts node_groups"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            DistributedLion(params, lr=LR, **kwargs)
    # Ranks that disagree on the nodes fail at construction, every one of them, before any sub-group is made.
    with pytest.raises(ValueError, match=r"disagree on the nodes .*ranks \[0, 1\] have nodes \[\[0, 1\], \[2, 3\]\]; "
                       r"ranks \[2, 3\] have nodes \[\[0, 1, 2, 3\]\]"):
        DistributedLion(params, lr=LR, intra_node_size=2 if rank < 2 else 4)


def _check_deepspeed_engine(rank, world, outdir):
    """The DeepSpeed surface: optimizer.params.intra_node_size through distlion_ds.initialize; the engine step is
    one hierarchical step; a non-finite gradient on one rank skips everywhere; save -> load -> continue is exact."""
    import logging

    import deepspeed

    import distlion_ds

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-45 s JIT build (DESIGN 4)
    deepspeed.utils.logger.setLevel(logging.WARNING)

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def batch(step):
        g = torch.Generator().manual_seed(100 * step + rank)
        return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)

    def train(engine, step, poison=False):
        x, y = batch(step)
        if poison:
            x[0, 0] = float("inf")
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()

    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6, "gradient_clipping": 0.0,
              "optimizer": {"type": "DistributedLion", "params": {"lr": LR, "intra_node_size": 2}}}
    engine, opt, _, _ = distlion_ds.initialize(model=net(0), config=config)
    assert opt._hier is not None and opt.comm_stats()["intra_node_size"] == 2
    ref = net(0)
    ref_opt = DistributedLion(ref.parameters(), lr=LR, intra_node_size=2)
    for step in range(1, 3):
        train(engine, step)
        x, y = batch(step)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for a, b in zip(engine.module.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
    engine.save_checkpoint(outdir, tag="t2")
    before = [p.detach().clone() for p in engine.module.parameters()]
    train(engine, 3, poison=rank == world - 1)
    assert opt.overflow and all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), before, strict=True))
    resumed, _, _, _ = distlion_ds.initialize(model=net(7), config=config)
    resumed.load_checkpoint(outdir, tag="t2")
    for step in (4, 5):
        train(engine, step)
        train(resumed, step)
    for a, b in zip(engine.module.parameters(), resumed.module.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)


def _worker_4(rank, world, outdir):
    consecutive = [[0, 1], [2, 3]]
    for aggregation in ("mavo", "avg"):
        _check_oracle(rank, world, consecutive, aggregation, intra_node_size=2)
    # Explicit, non-consecutive nodes, named out of order (local rank = rank order inside the node).
    _check_oracle(rank, world, [[0, 2], [1, 3]], "mavo", node_groups=[[2, 0], [3, 1]])
    _check_oracle(rank, world, [[0, 1, 2, 3]], "avg", intra_node_size=4)  # one node: M = 1
    _check_l1_equals_flat(rank, world)
    _check_bytes_formula(rank, world, 2)
    _check_resume_and_skip(rank, world, 2)
    _check_bad_groupings(rank, world)
    _check_deepspeed_engine(rank, world, outdir)


def _worker_8(rank, world):
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    for aggregation in ("mavo", "avg"):
        _check_oracle(rank, world, nodes, aggregation, intra_node_size=4)


@pytest.mark.slow
def test_four_ranks_two_nodes(tmp_path):
    spawn(_worker_4, 4, str(tmp_path))


@pytest.mark.slow
def test_eight_ranks_two_nodes_of_four():
    spawn(_worker_8, 8)


def test_single_process_refuses_nodes_and_fingerprint_names_layout():
    p = [torch.nn.Parameter(torch.zeros(8))]
    with pytest.raises(ValueError, match="intra_node_size=2 does not divide the data-parallel size 1"):
        DistributedLion(p, intra_node_size=2)
    with pytest.raises(ValueError, match="Invalid intra_node_size"):
        DistributedLion(p, intra_node_size=True)
    opt = DistributedLion(p, node_groups=[[0]])
    assert opt._settings()["intra_node_size"] == 1 and opt._settings()["node groups"] == [[0]]
    assert DistributedLion(p)._settings()["intra_node_size"] == 1


def _stderr():
    import contextlib
    import io

    return contextlib.redirect_stderr(io.StringIO())


def test_surfaces_deepspeed_key_and_megatron_flag():
    from distlion_ds.deepspeed.config import parse_deepspeed_config
    from distlion_ds.megatron.pretrain_gpt import parse_args, validate_args

    def ds(params):
        return {"train_batch_size": 4, "optimizer": {"type": "DistributedLion", "params": params}}

    plan = parse_deepspeed_config(ds({"intra_node_size": 4}))
    assert plan.optimizer.model_dump(exclude_none=True)["intra_node_size"] == 4
    assert parse_deepspeed_config(ds({})).optimizer.intra_node_size == 1
    for bad in (0, 2.0, True, "2"):
        with pytest.raises(ValueError, match="optimizer.params.intra_node_size"):
            parse_deepspeed_config(ds({"intra_node_size": bad}))
    # The DeepSpeed seam passes the params through: they are DistributedLion keyword arguments.
    opt = DistributedLion([torch.nn.Parameter(torch.zeros(8))], **plan.optimizer.model_dump(
        exclude_none=True, exclude={"intra_node_size", "local_steps"}), node_groups=[[0]])
    assert opt.intra_node_size == 1 and opt._hier is not None

    # The Megatron entry votes flat through megatron-core's DDP buckets: hierarchical is refused naming the flag.
    args = parse_args(["--train-iters", "2", "--dlion-intra-node-size", "1"])
    assert args.dlion_intra_node_size == 1 and validate_args(args, 4).dp == 4
    for argv, needle in ((["--dlion-intra-node-size", "0"], "must be >= 1"),
                         (["--dlion-intra-node-size", "2", "--optimizer", "adam"], "applies to --optimizer distlion"),
                         (["--dlion-intra-node-size", "2"], "votes flat")):
        with pytest.raises(SystemExit), _stderr() as err:
            parse_args(["--train-iters", "2", *argv])
        assert "--dlion-intra-node-size" in err.getvalue() and needle in err.getvalue(), err.getvalue()


def test_add_param_group_keeps_momentum_like_flat():
    """Re-bucketing (add_param_group) in the hierarchical machinery keeps the momentum, as flat D-Lion does."""
    runs = []
    for kwargs in ({}, {"node_groups": [[0]]}):
        params = _params()
        opt = DistributedLion(params[:3], lr=LR, betas=BETAS, weight_decay=WD, bucket_numel=512, **kwargs)
        for step in range(1, 5):
            if step == 3:
                opt.add_param_group({"params": params[3:], "lr": 2 * LR})
            live = params if step >= 3 else params[:3]
            for i, p in enumerate(live):
                p.grad = _grad(step, 0, i, SHAPES[i])
            opt.step()
        runs.append((params, opt))
    (flat_p, flat_opt), (hier_p, hier_opt) = runs
    for a, b in zip(flat_p, hier_p, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
        torch.testing.assert_close(flat_opt.state[a]["exp_avg"].reshape(-1), hier_opt.state[b]["exp_avg"],
                                   atol=0, rtol=0)
