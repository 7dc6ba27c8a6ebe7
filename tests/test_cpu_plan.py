"""The CPU plan: candidates tried in turn, each for a few steps, and the fastest kept."""

from __future__ import annotations

from clipengine.train.cpu_plan import CpuPlanner, Plan, candidates, describe


def test_candidates_cover_light_and_heavy_decoding():
    assert candidates(2) == [Plan(1, 1), Plan(1, 2), Plan(2, 1), Plan(2, 2)]
    assert candidates(1) == [Plan(1, 1)]
    assert Plan(4, 12) == candidates(16)[0] and Plan(16, 16) in candidates(16)


def test_each_candidate_is_timed_and_the_fastest_kept():
    seconds_per_step = {Plan(1, 1): 1.0, Plan(1, 2): 0.4, Plan(2, 1): 2.0, Plan(2, 2): 0.5}
    planner = CpuPlanner.for_run(2, steps_left=1000)
    tried, switches = [], []
    while planner.deciding:
        tried.append(planner.current)
        switched = planner.observe(seconds_per_step[planner.current], data_wait=0.1)
        if switched:
            switches.append(switched)
    assert switches == [Plan(1, 2), Plan(2, 1), Plan(2, 2), Plan(1, 2)]  # three more trials, then the winner
    assert tried.count(Plan(1, 2)) == 1 + 3  # its warm-up step, then 3 steps (1.2 s >= the 1 s minimum)
    assert tried.count(Plan(2, 1)) == 1 + 3 and tried.count(Plan(1, 1)) == 1 + 3
    assert tried.count(Plan(2, 2)) == 1 + 3 and planner.current == Plan(1, 2)
    assert planner.observe(0.1, 0.0) is None  # decided for good
    record = planner.record()
    assert record["chosen"] == {"workers": 1, "threads": 2}
    assert [t["steps_per_second"] for t in record["trials"]] == [1.0, 2.5, 0.5, 2.0]
    assert describe(record).startswith("cpu plan: 1 worker, 2 threads; tried 1w1t 1 steps/s (data wait 10%)")


def test_short_runs_and_set_plans_are_not_tried():
    assert not CpuPlanner.for_run(2, steps_left=10).deciding
    assert CpuPlanner.for_run(2, steps_left=10).current == Plan(1, 1)
    fixed = CpuPlanner.fixed(Plan(3, 5))
    assert not fixed.deciding and fixed.current == Plan(3, 5) and fixed.observe(1.0, 0.0) is None
