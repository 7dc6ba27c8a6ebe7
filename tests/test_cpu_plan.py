"""The CPU plan: candidates tried in turn, each for a few steps, and the fastest kept."""

from __future__ import annotations

from clipengine.training.cpu_plan import CpuPlanner, Plan, candidates, describe


def test_candidates_cover_light_and_heavy_decoding():
    assert candidates(2) == [Plan(1, 1), Plan(1, 2), Plan(2, 1), Plan(2, 2)]
    assert candidates(1) == [Plan(1, 1)]
    assert Plan(4, 12) == candidates(16)[0] and Plan(16, 16) in candidates(16)


def _decide(seconds_per_step: dict, wait_share: dict) -> tuple[CpuPlanner, list[Plan], list[Plan]]:
    planner = CpuPlanner.for_run(2, steps_left=1000)
    tried, switches = [], []
    while planner.deciding:
        plan = planner.current
        tried.append(plan)
        switched = planner.observe(seconds_per_step[plan], data_wait=wait_share[plan] * seconds_per_step[plan])
        if switched:
            switches.append(switched)
    return planner, tried, switches


def test_a_model_bound_run_tries_more_threads_and_keeps_the_fastest():
    seconds = {Plan(1, 1): 1.0, Plan(1, 2): 0.4, Plan(2, 1): 2.0, Plan(2, 2): 0.5}
    planner, tried, switches = _decide(seconds, {p: 0.01 for p in seconds})
    assert switches == [Plan(1, 2), Plan(1, 2)]  # the one plan with more threads, then the winner
    assert tried.count(Plan(1, 1)) == 1 + 3  # its warm-up step, then 3 steps (3 s >= the 1 s minimum)
    assert tried.count(Plan(1, 2)) == 1 + 3  # 3 steps of 0.4 s: 1.2 s
    assert planner.current == Plan(1, 2) and planner.observe(0.1, 0.0) is None  # decided for good
    record = planner.record()
    assert record["chosen"] == {"workers": 1, "threads": 2}
    assert [t["steps_per_second"] for t in record["trials"]] == [1.0, 2.5]
    assert describe(record).startswith("cpu plan: 1 worker, 2 threads; tried 1w1t 1 steps/s (data wait 1%)")


def test_a_data_bound_run_tries_more_workers():
    seconds = {Plan(1, 1): 1.0, Plan(1, 2): 0.9, Plan(2, 1): 0.6, Plan(2, 2): 0.7}
    planner, tried, switches = _decide(seconds, {Plan(1, 1): 0.5, Plan(1, 2): 0.5, Plan(2, 1): 0.05, Plan(2, 2): 0.05})
    assert switches == [Plan(2, 1), Plan(2, 2), Plan(2, 1)]  # more workers; then, no longer waiting, more threads
    assert Plan(1, 2) not in tried and planner.current == Plan(2, 1)


def test_short_runs_and_set_plans_are_not_tried():
    assert not CpuPlanner.for_run(2, steps_left=10).deciding
    assert CpuPlanner.for_run(2, steps_left=10).current == Plan(1, 1)
    fixed = CpuPlanner.fixed(Plan(3, 5))
    assert not fixed.deciding and fixed.current == Plan(3, 5) and fixed.observe(1.0, 0.0) is None


def test_streamed_runs_try_threads_alone():
    """A streamed run's workers are its data lanes: only the torch threads are tried."""
    planner = CpuPlanner.for_threads(1, 2, steps_left=100)
    assert planner.current == Plan(1, 1) and planner.plans == [Plan(1, 2)]
    switched = [planner.observe(0.5, 0.0) for _ in range(4)]  # model-bound steps: no wait for data
    assert switched == [None, None, None, Plan(1, 2)]
    two = CpuPlanner.for_threads(2, 2, steps_left=100)
    assert two.current == Plan(2, 1) and two.plans == [Plan(2, 2)]
    assert CpuPlanner.for_threads(0, 4, steps_left=100).current == Plan(0, 4)
    assert CpuPlanner.for_threads(1, 2, steps_left=10).chosen == Plan(1, 1)  # too short to try
