"""Data workers and torch threads for a CPU run, chosen by measuring this run.

No fixed rule fits every run: with the `tiny` model on 64-px scenes decoding is most of the work and
one worker plus one torch thread was fastest on 2 cores; with the 4-layer width-256 `small` model the
single torch thread was the bottleneck and one worker plus two threads ran 1.75x faster. So the first
steps of a run try candidate plans for a few steps each (real training steps: which process decodes a
sample or how many threads multiply a matrix never changes the numbers beyond rounding, so trying costs
only the time a slower plan takes) and the run keeps the fastest. The trials and the decision go to the
run's log.

Candidates on c cores: workers in {c/4, c/2, c} and, for each, torch threads filling the cores the
workers leave, or all c (a worker that mostly waits leaves its core to torch). The first trial's wait
for data prunes the rest: on 2 cores a model-bound run tries 2 plans, a data-bound one 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIN_TRIAL_STEPS = 3  # measured steps per candidate, after one step to start its workers
MIN_TRIAL_SECONDS = 1.0  # and at least this long, so that a fast model is not timed on noise
MIN_RUN_STEPS = 24  # shorter runs keep the first candidate: trying would take much of the run
WAITING = 0.1  # a plan whose steps spend this share or more waiting for a batch is bound by the data


@dataclass(frozen=True)
class Plan:
    workers: int
    threads: int


@dataclass
class Trial:
    plan: Plan
    steps: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0  # of `seconds`, spent waiting for a batch

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def candidates(cores: int) -> list[Plan]:
    """The plans worth trying on `cores`, the no-oversubscription default first."""
    plans: list[Plan] = []
    for workers in (max(1, cores // 4), max(1, cores // 2), cores):
        for threads in (max(1, cores - workers), cores):
            if Plan(workers, threads) not in plans:
                plans.append(Plan(workers, threads))
    return plans


@dataclass
class CpuPlanner:
    """Feeds each step's time to `observe`; it answers with the plan the next steps should use.

    After each trial the time spent waiting for data says where to look next: a run that hardly waits
    is bound by the model and tries more torch threads only; one that waits tries more workers only.
    """

    plans: list[Plan]  # still to try, in order
    trials: list[Trial] = field(default_factory=list)
    chosen: Plan | None = None
    _warm: bool = False

    @classmethod
    def for_run(cls, cores: int, steps_left: int) -> CpuPlanner:
        return cls._trying(candidates(cores), steps_left)

    @classmethod
    def for_threads(cls, workers: int, cores: int, steps_left: int) -> CpuPlanner:
        """Trials of the torch threads alone, for a run whose workers are fixed (streamed data: they are its lanes)."""
        if workers == 0:  # the data is read in the training process: every core is torch's
            return cls.fixed(Plan(0, cores))
        plans = [Plan(workers, p.threads) for p in candidates(cores) if p.workers == min(workers, cores)]
        if len(plans) < 2:
            return cls.fixed(plans[0] if plans else Plan(workers, 1))
        return cls._trying(plans, steps_left)

    @classmethod
    def _trying(cls, plans: list[Plan], steps_left: int) -> CpuPlanner:
        """The first plan on trial, the rest to come; a run too short to repay trials keeps the first."""
        if steps_left < MIN_RUN_STEPS:
            return cls.fixed(plans[0])
        return cls(plans[1:], [Trial(plans[0])])

    @classmethod
    def fixed(cls, plan: Plan) -> CpuPlanner:
        """No trials: the plan the user set (or the GPU's, or a distributed run's, whose ranks must agree)."""
        return cls([], [Trial(plan)], chosen=plan)

    @property
    def current(self) -> Plan:
        return self.chosen or self.trials[-1].plan

    @property
    def deciding(self) -> bool:
        return self.chosen is None

    def observe(self, seconds: float, data_wait: float) -> Plan | None:
        """One step's time (and its wait for data) under `current`; a new plan to switch to, or None."""
        if self.chosen is not None:
            return None
        trial = self.trials[-1]
        if not self._warm:  # the first step of a plan starts its workers: not representative
            self._warm = True
            return None
        trial.steps += 1
        trial.seconds += seconds
        trial.data_wait += data_wait
        if trial.steps < MIN_TRIAL_STEPS or trial.seconds < MIN_TRIAL_SECONDS:
            return None
        tried = trial.plan
        if trial.data_wait < WAITING * trial.seconds:  # bound by the model: more threads might help
            self.plans = [p for p in self.plans if p.workers == tried.workers and p.threads > tried.threads]
        else:  # bound by the data: more workers might
            self.plans = [p for p in self.plans if p.workers > tried.workers]
        if self.plans:
            self.trials.append(Trial(self.plans.pop(0)))
            self._warm = False
            return self.trials[-1].plan
        self.chosen = max(self.trials, key=lambda t: t.steps_per_second).plan
        return self.chosen

    def record(self) -> dict:
        """What the run's log keeps: every trial's rate and data wait, and the decision."""
        return {"kind": "plan", "chosen": asdict(self.current) if self.chosen else None,
                "trials": [{**asdict(t.plan), "steps": t.steps, "steps_per_second": round(t.steps_per_second, 4),
                            "data_wait_fraction": round(t.data_wait / t.seconds, 4) if t.seconds else None}
                           for t in self.trials if t.steps]}


def describe(record: dict) -> str:
    """The decision as one line: 'cpu plan: 1 worker, 2 threads (tried 1w1t 0.31 steps/s, 1w2t 0.55 ...)'."""
    chosen = record["chosen"]
    tried = ", ".join(f"{t['workers']}w{t['threads']}t {t['steps_per_second']:.3g} steps/s "
                      f"(data wait {t['data_wait_fraction']:.0%})" for t in record["trials"])
    return (f"cpu plan: {chosen['workers']} worker{'s' if chosen['workers'] != 1 else ''}, "
            f"{chosen['threads']} thread{'s' if chosen['threads'] != 1 else ''}; tried {tried}")
