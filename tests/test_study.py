"""The study harness's bookkeeping (benchmarks/study): names, the plan's order, the report's arithmetic and markers.

Training itself is exercised by the harness's own smoke and resume runs (benchmarks/study/README.md); these tests
are the parts whose mistakes would silently mislabel or drop results.
"""

import dataclasses
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.study import plan, report  # noqa: E402
from benchmarks.study.common import (  # noqa: E402
    SUITES,
    lr_grid,
    method_results,
    parse_method,
    result_path,
    run_name,
    study_grid,
)


def test_method_names_parse_and_bad_ones_name_the_flag():
    assert parse_method("diloco_int8_H32") == {"kind": "diloco", "H": 32, "quantization": "int8"}
    assert parse_method("local_dlion_H8") == {"kind": "local_dlion", "H": 8, "quantization": None}
    assert parse_method("dlion_avg")["H"] == 1
    for bad in ("diloco_H8", "local_dlion_H0", "sgd"):
        with pytest.raises(ValueError, match="--method"):
            parse_method(bad)


def test_result_names():
    assert run_name("adamw", 2e-3, 0) == "adamw_lr0.002_s0"
    assert run_name("adamw", 2e-3, 1, wd=0.0) == "adamw_lr0.002_wd0.0_s1"  # a non-default wd is in the name
    assert run_name("lion", 4e-4, 0, wd=0.5) == "lion_lr0.0004_s0"  # the default is not
    assert run_name("lion", 4e-4, 0, wd=0.1, suite=SUITES["study"]) == "lion_lr0.0004_s0"  # the study's default
    assert result_path(SUITES["demo"], "lion", 4e-4, 0).parent.name == "demo"


def test_plan_order_and_counts(tmp_path, monkeypatch):
    monkeypatch.setitem(plan.SUITES, "study", dataclasses.replace(SUITES["study"], results=tmp_path))  # no results
    runs = plan.planned_runs("study")
    assert len(runs) == 13 * 3 * 2 + 2  # + a third seed for global Lion and D-Lion MaVo
    assert len({(r["method"], r["lr"], r["seed"]) for r in runs}) == len(runs)
    # AdamW's middle lr, then the whole H=32 sweep of the first target (middles first), then DiLoCo-int8 at H=32.
    head = [(r["method"], r["lr"]) for r in runs[:8]]
    assert head[0] == ("adamw", 2e-3)
    assert head[1:3] == [("local_dlion_H32", lr_grid("local_dlion_H32")[0]), ("diloco_fp32_H32", 0.4)]
    assert sorted(head[1:7]) == sorted([(m, lr) for m in ("local_dlion_H32", "diloco_fp32_H32") for lr in lr_grid(m)])
    assert head[7] == ("diloco_int8_H32", 0.4)
    assert [(r["method"], r["seed"]) for r in runs[8:10]] == [("local_dlion_H32", 1), ("diloco_fp32_H32", 1)]
    # The second target's sweeps (D-Lion MaVo, global Lion, AdamW; AdamW's middle is already in), then that trio
    # again with seed 1 at its seed-0 best (the middle until results exist).
    sweep = runs[10:18]
    assert all(r["seed"] == 0 for r in sweep) and {r["method"] for r in sweep} == {"dlion_mavo", "lion", "adamw"}
    assert [(r["method"], r["seed"]) for r in runs[18:21]] == [("dlion_mavo", 1), ("lion", 1), ("adamw", 1)]
    # Then the rest of the trio's sweep with seed 1 (its best lr is chosen on two seeds), then the third seeds.
    assert sorted((r["method"], r["lr"]) for r in runs[18:27] if r["seed"] == 1) == \
        sorted((m, lr) for m in ("dlion_mavo", "lion", "adamw") for lr in lr_grid(m))
    assert [(r["method"], r["seed"]) for r in runs[27:29]] == [("lion", 2), ("dlion_mavo", 2)]
    rest = runs[:8] + runs[10:18] + runs[29:]
    assert all(r["seed"] == 0 for r in rest[:39]) and all(r["seed"] == 1 for r in rest[39:])
    assert all(r["wd"] == 0.1 for r in runs)  # the study's Lion-family weight decay is the demo sweep's 0.1
    assert len(plan.planned_runs("study", int4=True)) == 16 * 3 * 2 + 2
    demo = plan.planned_runs("demo")
    assert len(demo) == 44 and demo[0] == {"method": "adamw", "lr": 1e-3, "seed": 0, "wd": 0.1}


def test_seed_one_starts_at_each_methods_seed_zero_best(tmp_path, monkeypatch):
    suite = dataclasses.replace(SUITES["study"], results=tmp_path)
    monkeypatch.setitem(plan.SUITES, "study", suite)
    for lr, loss in zip(lr_grid("lion"), (3.9, 3.7, 3.8), strict=True):  # the low lr is lion's best
        result_path(suite, "lion", lr, 0, 0.1).write_text(json.dumps({"final_val_loss": loss}))
    seed1 = [r for r in plan.planned_runs("study") if r["seed"] == 1]
    firsts = {}
    for r in seed1:
        firsts.setdefault(r["method"], r["lr"])
    assert firsts["lion"] == lr_grid("lion")[1]
    assert firsts["adamw"] == lr_grid("adamw")[0]  # no seed-0 results: the middle
    # The best is the grid's lowest lr: the one seed-0 run left is the next point below it (half of it here).
    assert [r["lr"] for r in plan.pending("study") if r["method"] == "lion" and r["seed"] == 0] == [3.75e-5]


def test_the_third_seed_goes_to_the_best_lr_on_the_seeds_every_lr_shares(tmp_path, monkeypatch):
    suite = dataclasses.replace(SUITES["study"], results=tmp_path)
    monkeypatch.setitem(plan.SUITES, "study", suite)
    mid, low, high = lr_grid("lion")

    def result(lr, seed, loss):
        result_path(suite, "lion", lr, seed, 0.1).write_text(json.dumps({"final_val_loss": loss}))

    def third():
        return sorted(r["lr"] for r in plan.planned_runs("study") if r["method"] == "lion" and r["seed"] == 2)

    for lr, loss in ((mid, 4.0), (low, 4.05), (high, 4.1)):
        result(lr, 0, loss)
    assert third() == [mid]  # seed 0 alone: the middle is the best
    result(mid, 1, 4.3)  # an unlucky seed 1 at the middle; the low lr has no seed 1 yet: compared on seed 0
    assert third() == [mid]
    result(low, 1, 3.98)
    result(high, 1, 4.2)  # every lr has seeds 0 and 1: the low lr's mean (4.015) beats the middle's (4.15)
    assert third() == [low]
    assert plan._seed0_best("study", "lion") == mid  # seed 1 at the other lrs still starts from the seed-0 best
    result(mid, 2, 4.25)  # a third seed run at the middle when it was the best stays in the plan (and is counted)
    assert third() == [low, mid]
    assert report.best_lr(method_results(suite, "lion", [mid, low, high])) == low  # the report picks the same


def test_a_grid_is_extended_past_an_edge_best_a_bounded_number_of_times(tmp_path, monkeypatch):
    suite = dataclasses.replace(SUITES["study"], results=tmp_path)
    monkeypatch.setitem(plan.SUITES, "study", suite)
    mid, low, high = lr_grid("diloco_fp32_H128")  # 0.4, 0.2, 0.7: the high step is x1.75

    def result(lr, loss):
        result_path(suite, "diloco_fp32_H128", lr, 0, 0.1).write_text(json.dumps({"final_val_loss": loss}))

    def seed0_lrs():
        return [r["lr"] for r in plan.planned_runs("study") if r["method"] == "diloco_fp32_H128" and r["seed"] == 0]

    result(mid, 5.0)
    result(high, 4.9)
    assert study_grid(suite, "diloco_fp32_H128") == [mid, low, high]  # the sweep is not complete: nothing added
    result(low, 5.1)
    assert study_grid(suite, "diloco_fp32_H128") == [mid, low, high, 1.225]  # 0.7 x 1.75
    runs = plan.planned_runs("study")
    ext = runs.index({"method": "diloco_fp32_H128", "lr": 1.225, "seed": 0, "wd": 0.1})
    assert all(r["seed"] == 0 for r in runs[:ext + 1] if r["method"] == "diloco_fp32_H128")
    assert ext < runs.index({"method": "diloco_fp32_H128", "lr": high, "seed": 1, "wd": 0.1})  # seed 1 after it
    assert len(runs) == 13 * 3 * 2 + 2 + 2  # the new lr with seeds 0 and 1
    result(1.225, 4.8)  # better again: one more step (1.225 x 1.75)
    assert seed0_lrs() == [mid, low, high, 1.225, 2.144]
    result(2.144, 4.7)  # better again, but the grid has had its MAX_GRID_EXTENSIONS
    assert study_grid(suite, "diloco_fp32_H128") == [mid, low, high, 1.225, 2.144]
    assert [r["lr"] for r in plan.planned_runs("study") if r["method"] == "diloco_fp32_H128" and r["seed"] == 1][0] \
        == 2.144  # seed 1 starts at the best, wherever it is
    # A worse extension ends the search: the edge point stays the best.
    for f in tmp_path.glob("*.json"):
        f.unlink()
    for lr, loss in ((mid, 5.0), (low, 4.9), (high, 5.1), (0.1, 4.95)):
        result(lr, loss)
    assert study_grid(suite, "diloco_fp32_H128") == [mid, low, high, 0.1]
    assert plan._seed0_best("study", "diloco_fp32_H128") == low


def test_steps_to_target_interpolates_between_validation_points():
    curve = [{"step": 0, "val_loss": 8.0}, {"step": 100, "val_loss": 6.0}, {"step": 200, "val_loss": 5.0}]
    assert report.steps_to_target(curve, 5.5) == 150.0
    assert report.steps_to_target(curve, 6.0) == 100.0
    assert report.steps_to_target(curve, 9.0) == 0.0
    assert report.steps_to_target(curve, 4.9) is None


def test_slownet_time_to_target_is_steps_times_the_measured_step():
    curve = [{"step": 0, "val_loss": 8.0}, {"step": 100, "val_loss": 6.0}, {"step": 200, "val_loss": 5.0}]
    run = {"method": "dlion_mavo", "lr": 3e-4, "seed": 0, "valid_curve": curve}
    rows = [{"best_runs": [run]}, {"best_runs": [dict(run, method="adamw", lr=2e-3)]}, {"best_runs": []}]
    slownet = {"conditions": [{"bandwidth": "100mbit", "latency": "5ms",
                               "rows": [{"method": "dlion_mavo", "s_per_step": 0.6}]}]}
    table = report.slownet_table(rows, 5.5, slownet).splitlines()
    assert len(table) == 4  # header, rule, one line per method with runs
    assert table[2] == "| dlion_mavo (0.0003) | 150 | 0.600 | 1.5 min |"  # 150 steps x 0.6 s
    assert table[3] == "| adamw (0.002) | 150 | not measured | — |"


def test_best_lr_is_the_lowest_mean_over_seeds():
    runs = [{"lr": 1.0, "final_val_loss": 3.0, "seed": 0}, {"lr": 1.0, "final_val_loss": 5.0, "seed": 1},
            {"lr": 2.0, "final_val_loss": 3.5, "seed": 0}, {"lr": 2.0, "final_val_loss": 3.9, "seed": 1}]
    assert report.best_lr(runs) == 2.0  # 3.7 < 4.0, although lr 1.0 has the single best run


def test_best_lr_compares_lrs_on_the_seeds_they_share():
    # lr 2.0 was the seed-0 best and got an unlucky seed 1; lr 1.0 has seed 0 only: compared on seed 0, 2.0 wins.
    runs = [{"lr": 1.0, "final_val_loss": 3.6, "seed": 0},
            {"lr": 2.0, "final_val_loss": 3.5, "seed": 0}, {"lr": 2.0, "final_val_loss": 3.9, "seed": 1}]
    assert report.best_lr(runs) == 2.0
    runs.append({"lr": 1.0, "final_val_loss": 3.7, "seed": 1})  # both seeds everywhere: the means decide (3.65)
    assert report.best_lr(runs) == 1.0


def test_a_best_lr_at_the_end_of_its_grid_is_flagged():
    low, mid, high = sorted(lr_grid("dlion_mavo"))

    def runs(*lrs_losses):
        return [{"lr": lr, "final_val_loss": v} for lr, v in lrs_losses]

    assert report.grid_edge("dlion_mavo", runs((low, 4.1), (mid, 4.2)), low) == "lowest"
    assert report.grid_edge("dlion_mavo", runs((mid, 4.3), (high, 4.2)), high) == "highest"
    assert report.grid_edge("dlion_mavo", runs((low, 4.3), (mid, 4.1), (high, 4.2)), mid) is None
    assert report.grid_edge("dlion_mavo", runs((low, 4.1)), low) is None  # one lr run: nothing decided yet
    below = low / 2  # a point the plan added: the edge is the lowest lr run
    assert report.grid_edge("dlion_mavo", runs((below, 4.3), (low, 4.1), (mid, 4.2)), low) is None
    assert report.grid_edge("dlion_mavo", runs((below, 4.0), (low, 4.1), (mid, 4.2)), below) == "lowest"


def test_the_edge_note_says_when_the_plan_does_not_go_past_an_edge():
    low, mid, high = sorted(lr_grid("lion"))

    def rows(vals):
        runs = [{"method": "lion", "lr": lr, "seed": s, "final_val_loss": v, "bytes_sent_per_worker": 1,
                 "bits_per_param_step": 1.0} for (lr, s), v in vals.items()]
        return report.summarize(runs, ["lion"], {})

    seed0 = {(low, 0): 4.0, (mid, 0): 4.1, (high, 0): 4.2}  # seed 0's best is the low end: the plan extends
    assert report.edge_note(rows(seed0)).endswith("at most 2 times per method.")
    # seed 0's best is the middle, the two-seed means' the low end: no point past it is planned
    two = {(low, 0): 4.05, (mid, 0): 4.0, (high, 0): 4.2, (low, 1): 4.0, (mid, 1): 4.3, (high, 1): 4.2}
    assert "for lion the edge is the best on the seeds every lr shares but not seed 0's" in report.edge_note(rows(two))


def test_sections_are_replaced_between_markers_and_the_rest_kept():
    text = "# Results\n\nothers' section\n"
    once = report.replace_section(text, report.STUDY_MARKERS, "Study", "body 1")
    assert once.startswith(text.rstrip("\n")) and "body 1" in once
    twice = report.replace_section(once + "\n## later section\n", report.STUDY_MARKERS, "Study", "body 2")
    assert "body 1" not in twice and "body 2" in twice and twice.count(report.STUDY_MARKERS[0]) == 1
    assert "others' section" in twice and "## later section" in twice


def test_betas_ablation_rows_and_the_suites_own_betas_marked():
    ablation = [{"method": "local_dlion_H10", "lr": 4e-3, "final_val_loss": 5.5,
                 "config": {"outer_betas": [0.9, 0.99]}}]
    suite_runs = [{"method": "local_dlion_H10", "lr": 4e-3, "final_val_loss": 5.25, "config": {}},  # the default's
                  {"method": "local_dlion_H10", "lr": 8e-3, "final_val_loss": 5.0, "config": {}},  # another lr
                  {"method": "adamw", "lr": 2e-3, "final_val_loss": 4.0, "config": {"outer_betas": None}}]
    lines = report.betas_ablation(ablation, suite_runs, (0.0, 0.99))
    assert lines[2:] == ["| local_dlion_H10 | 0.004 | (0, 0.99) (the suite's) | 5.2500 |",
                         "| local_dlion_H10 | 0.004 | (0.9, 0.99) | 5.5000 |"]
    assert report.betas_ablation([], suite_runs, (0.0, 0.99)) == []


def test_targets_decide_with_seeds_and_list_them():
    def runs(method, lr, vals):
        return [{"method": method, "lr": lr, "seed": s, "final_val_loss": v, "bytes_sent_per_worker": 1,
                 "bits_per_param_step": 1.0} for s, v in enumerate(vals)]

    results = runs("dlion_mavo", 1.5e-4, [4.1, 4.0, 4.3]) + runs("lion", 1.5e-4, [4.0, 4.3, 4.28]) \
        + runs("adamw", 2e-3, [3.65])
    lines = report.targets(report.summarize(results, ["adamw", "lion", "dlion_mavo"], {}))
    lion = next(x for x in lines if "vs global Lion" in x)
    adamw = next(x for x in lines if "vs AdamW" in x)
    assert "within the seed spread" in lion and "dlion_mavo 4.1000 (s0) / 4.0000 (s1) / 4.3000 (s2)" in lion
    assert "undecided: one seed" in adamw
    results += runs("adamw", 2e-3, [3.65, 3.64])[1:]
    adamw = next(x for x in report.targets(report.summarize(results, ["adamw", "lion", "dlion_mavo"], {}))
                 if "vs AdamW" in x)
    assert ": decided." in adamw and "adamw 3.6500 (s0) / 3.6400 (s1)" in adamw


def test_the_paired_comparison_counts_runs_with_the_same_lr_and_seed():
    def rows(method, runs):
        return {"method": method, "runs": [{"lr": lr, "seed": s, "final_val_loss": v} for lr, s, v in runs]}

    a = rows("dlion_mavo", [(1e-4, 0, 4.2), (1e-4, 1, 4.1), (2e-4, 0, 4.0), (2e-4, 1, 3.9), (4e-4, 0, 5.0)])
    b = rows("lion", [(1e-4, 0, 4.0), (1e-4, 1, 4.3), (2e-4, 0, 3.9), (2e-4, 1, 3.85), (8e-4, 0, 1.0)])
    (line,) = report.paired_line(a, b)
    # 4 pairs (4e-4 and 8e-4 have no partner): +0.2, -0.2, +0.1, +0.05; 3 of 4 higher, median +0.075;
    # sign test: P(3 or more of 4) = 5/16, two-sided 0.625.
    assert "4 pairs" in line and "higher in 3 of 4" in line and "median difference +0.0750" in line
    assert "p = 0.625" in line and "0.0001 s1 -0.200" in line
    assert report.paired_line(rows("x", [(1.0, 0, 1.0)]), rows("y", [(1.0, 0, 2.0)])) == []  # one pair decides nothing


def test_seed_spread_table_is_the_spread_of_window_means_per_step():
    def run(seed, level, final):  # training loss `level` everywhere, 1.0 higher in the first 64 steps
        return {"seed": seed, "train_loss": [level + (i < 64) for i in range(256)], "final_val_loss": final}

    rows = [{"method": "lion", "best_lr": 1.5e-4, "best_runs": [run(1, 4.5, 4.3), run(0, 4.0, 4.0)]},
            {"method": "adamw", "best_lr": 2e-3, "best_runs": [run(0, 3.0, 3.6)]}]  # one seed: no line
    table = report.seed_spread_table(rows, steps=(64, 128, 512), window=16).splitlines()
    assert table[0] == "| method (best lr) | seeds | step 64 | step 128 | step 512 | final val loss |"
    assert table[2] == "| lion (0.00015) | 2 | 0.500 | 0.500 | — | 0.300 |"  # step 512: past the runs' end
    assert len(table) == 3
    assert report.seed_spread_table(rows[1:]) is None
