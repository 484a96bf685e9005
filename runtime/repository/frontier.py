"""Auto-tiering's files: the measured frontier of candidate widths, and the tier set chosen
from it. No torch: the serving side reads both, and swaps tiers without sampling the INN.

Layout inside one model's directory::

    frontier/frontier.json         every candidate: channel counts, accuracy, FLOPs, params,
                                   latency per batch size, on the Pareto frontier or not
    frontier/<candidate>/model.onnx  the candidate, exported (an engine builds from it alone)
    auto_tiers.json                the live choice: candidate names, why, expected gain

``auto_tiers.json`` names its frontier's ``source_sha256``: a choice made on another frontier
(the INN was rebuilt since) is ignored and the hand-written tiers are served.

Example:
    >>> f = Frontier.read(Path("repo/mnist/frontier/frontier.json"))  # doctest: +SKIP
    >>> [c.name for c in f.pareto()]  # doctest: +SKIP
    ['w100', 'w081', 's056', 'w044', 'w025']
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.atomic import write_json
from runtime.repository.config import AutoTiersConfig, ModelConfig
from runtime.repository.errors import RepositoryError
from runtime.repository.profile import profile_problem
from runtime.repository.records import Rows, fields_problem, known_fields
from runtime.utc import seconds, stamp

FRONTIER_DIR = "frontier"
FRONTIER_FILE = "frontier.json"
ACTIVE_FILE = "auto_tiers.json"
APPLY_KEPT = 3  # exit status of `innfer tiers apply` when the live set stays
# ... and when another apply of the model runs on this machine (a hand one beside the
# server's): load, not a failure - the server counted it "failed" and backed off for
# rebuild.min_interval_s with an ERROR line (review helper-310)
APPLY_BUSY = 4


def weights_mb(params: int) -> float:
    """fp32 weights of ``params`` parameters, in mebibytes (2**20 bytes, Kubernetes' ``Mi``:
    what max_memory_mb bounds)."""
    return params * 4 / 2**20


@dataclass(frozen=True)
class Candidate:
    """One measured width setting.

    ``latency`` is a profile table (``{"1": {"p50_ms", "p90_ms", "runs"}, "8": ...}``, the
    shape of profile.json's per-tier tables); ``width`` is the uniform fraction, or for a
    ``shaped`` (non-uniform) candidate the uniform width whose channel total it keeps;
    ``accuracy`` is measured on the evaluation set, or the FLOPs fraction where the model
    has none (``Frontier.accuracy_source`` says which)."""

    name: str
    sizes: dict[str, int]
    width: float
    flops: int
    params: int
    accuracy: float
    latency: dict[str, dict[str, float]]
    onnx_sha256: str
    shaped: bool = False
    pareto: bool = False
    input_rows: dict[str, Rows] | None = None  # as TierRecord.input_rows

    def p50_ms(self, batch: int) -> float:
        """Median latency at ``batch`` (the next profiled size up)."""
        sizes = sorted(int(b) for b in self.latency)
        fit = next((b for b in sizes if b >= batch), sizes[-1])
        return float(self.latency[str(fit)]["p50_ms"])

    @property
    def memory_mb(self) -> float:
        """The weights' size in fp32, megabytes: what the engine keeps in memory at least."""
        return weights_mb(self.params)

    def problem(self) -> str | None:
        """What is wrong with a field, if anything (a hand edit of frontier.json): the same
        checks as a tier's record, and its latency table as a profile's."""
        said = fields_problem(self) or profile_problem({"tiers": {self.name: self.latency}})
        if not said and self.accuracy is None:  # (a tier's may be: a frontier always scores
            # its candidates, by FLOPs at worst - null failed the choice as an internal
            # error; review helper-255)
            said = "accuracy is null, not a score in [-1, 1]"
        return f"candidate {self.name!r}: {said}" if said else None


@dataclass
class Frontier:
    """All candidates measured for one model, on one device and backend."""

    candidates: list[Candidate]
    accuracy_source: str  # e.g. "evaluation mnist5k (1000 samples)" or "flops"
    source_sha256: str  # what the candidates were sampled from (INN, widths, sampling)
    backend: str
    device: str
    threads: int
    max_batch: int
    sensitivity: dict[str, float] = field(default_factory=dict)  # accuracy lost per group
    # ``inn_fingerprint`` of the INN the candidates were sampled from (None: a frontier from
    # before it was kept), checked at load like a tier's: a replaced INN is not served stale.
    inn_sha256: str | None = None
    # ``inn_structure`` of that INN (None: from before it was kept): the same weights under
    # another network are another INN (review 198).
    inn_structure_sha256: str | None = None
    measured_at: str = field(default_factory=stamp)
    # ``candidate_settings`` of the model.yaml it was built for (None: a frontier from before
    # they were kept): compared, torch-free, by every choice and load.
    settings: dict[str, Any] | None = None

    def stale_settings(self, config: ModelConfig) -> list[str]:
        """The model.yaml settings that make candidates and differ from those this frontier
        was built for (``auto_tiers.widths`` edited without a rebuild: a choice among the old
        candidates, at widths model.yaml no longer lists, was applied and served). The engine
        threads its latencies were measured at count too: a frontier profiled at 1 thread
        chose and planned a 4-thread server's tiers with 1-thread times."""
        if config.auto_tiers is None:
            return []
        now = candidate_settings(config) if self.settings is not None else {}
        stale = [k for k in sorted(now) if self.settings.get(k) != now[k]]
        return stale + (["threads"] if self.threads != config.threads else [])

    def unmet_goals(self, goals: AutoTiersConfig) -> str | None:
        """Why no tier set this frontier offers can meet ``goals``, or None: no Pareto
        candidate reaches ``accuracy_floor``, or none that does fits ``max_memory_mb``
        alone. Every choice would fail the same way; the build and the server say so once,
        where a server used to learn it at each check, after traffic came.

        Example:
            >>> frontier.unmet_goals(AutoTiersConfig(accuracy_floor=0.99))  # doctest: +SKIP
            'no frontier candidate reaches accuracy_floor 0.99 (the best is 0.9712): ...'
        """
        floor = goals.accuracy_floor
        keep = [c for c in self.candidates if floor is None or c.accuracy >= floor]
        if not keep:
            best = max(c.accuracy for c in self.candidates)
            return (f"no frontier candidate reaches accuracy_floor {floor} (the best is "
                    f"{best:.4f}): lower the floor or measure wider candidates")  # fmt: skip
        least = min(c.memory_mb for c in keep)
        if goals.max_memory_mb is not None and least > goals.max_memory_mb:
            which = f"at or above accuracy_floor {floor} " if floor is not None else ""
            return (f"no frontier candidate {which}fits max_memory_mb {goals.max_memory_mb}: "
                    f"the smallest such needs {least:.3g} MiB; raise the limit"
                    + (" or lower the floor" if floor is not None else ""))  # fmt: skip
        return None

    def set_breaks(self, names, goals: AutoTiersConfig) -> list[str]:
        """The goals the set of candidates ``names`` breaks, each said with its numbers
        (empty: none) - as ``sim.tiering.live_breaks`` says them: goals tightened in
        model.yaml after a choice leave an ``auto_tiers.json`` the goals now forbid."""
        out = []
        if len(names) > goals.max_tiers:
            out.append(f"it has {len(names)} tiers, over max_tiers {goals.max_tiers}")
        memory = sum(self.candidate(n).memory_mb for n in names)
        if goals.max_memory_mb is not None and memory > goals.max_memory_mb:
            out.append(
                f"its weights need {memory:.4g} MiB, over max_memory_mb {goals.max_memory_mb}"
            )
        floor = goals.accuracy_floor
        low = [c for n in names if floor is not None and (c := self.candidate(n)).accuracy < floor]
        if low:
            accs = ", ".join(f"{c.name} {c.accuracy:.4f}" for c in low)
            out.append(f"{accs} below accuracy_floor {floor}")
        return out

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.candidates)
        raise KeyError(f"no candidate {name!r} on the frontier (candidates: {known})")

    def pareto(self) -> list[Candidate]:
        """The candidates no other one beats on both accuracy and latency, fastest first."""
        return sorted((c for c in self.candidates if c.pareto), key=lambda c: c.p50_ms(1))

    def pareto_within(
        self, floor: float | None = None, max_memory_mb: float | None = None
    ) -> list[Candidate]:
        """``pareto`` among the candidates at or above ``floor`` whose weights alone fit
        ``max_memory_mb``, fastest first: a candidate beaten only by ones too large is on
        this frontier - cut from the whole frontier first, the memory limit left the least
        accurate tier where a better one fitted (review helper-283)."""
        keep = [
            c for c in self.candidates
            if (floor is None or c.accuracy >= floor)
            and (max_memory_mb is None or c.memory_mb <= max_memory_mb)
        ]  # fmt: skip
        marked = mark_pareto(keep, (1, self.max_batch))
        return sorted((c for c in marked if c.pareto), key=lambda c: c.p50_ms(1))

    def profile(self, names: list[str]) -> dict[str, Any]:
        """A profile.json document for the candidates ``names``, from their measurements."""
        return {
            "device": self.device,
            "backend": self.backend,
            "threads": self.threads,
            "measured_at": self.measured_at,
            "tiers": {n: self.candidate(n).latency for n in names},
        }

    def write(self, path: Path) -> None:
        data = asdict(self)
        write_json(path, data)

    @classmethod
    def read(cls, path: Path) -> Frontier:
        try:
            data = known_fields(cls, json.loads(Path(path).read_text()), path)
            data["candidates"] = [Candidate(**known_fields(Candidate, c, path))
                                  for c in data["candidates"]]  # fmt: skip
            frontier = cls(**data)
        except FileNotFoundError:
            raise RepositoryError(
                f"{path} is missing: run `innfer build` (model.yaml has auto_tiers)"
            ) from None
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # bad JSON, not UTF-8
            raise RepositoryError(f"{path} is corrupted ({exc}): run `innfer build`") from None
        except OSError as exc:  # a folder in its place, an I/O error: as corrupted (it failed
            # the whole model; review helper-271) - a permission error keeps its own advice
            if isinstance(exc, PermissionError):
                raise
            raise RepositoryError(
                f"{path} cannot be read ({exc.strerror or exc}): run `innfer build`"
            ) from None
        problem = frontier._problem()
        if problem is not None:  # valid JSON, a wrong value inside: it failed at load or
            # in a choice, as a traceback that named no file (or was served as it was)
            raise RepositoryError(f"{path} is corrupted ({problem}): run `innfer build`")
        return frontier

    def _problem(self) -> str | None:
        if not self.candidates:
            return "no candidates"
        if self.settings is not None and not isinstance(self.settings, dict):
            return f"settings is {self.settings!r}, not an object"
        if not isinstance(self.sensitivity, dict):
            return f"sensitivity is {self.sensitivity!r}, not an object"
        names = [c.name for c in self.candidates]
        if dup := sorted({n for n in names if names.count(n) > 1}, key=str):
            # ``candidate(name)`` found the first: a choice of one served the other's engine
            return f"candidate names {', '.join(map(repr, dup))} appear more than once"
        for c in self.candidates:  # bool("no") is True: a string was read as a mark
            for flag in ("pareto", "shaped"):
                if not isinstance(getattr(c, flag), bool):
                    return (f"candidate {c.name!r}: {flag} is {getattr(c, flag)!r}, not true "
                            "or false")  # fmt: skip
        return next((p for c in self.candidates if (p := c.problem()) is not None), None)


def candidate_settings(config: ModelConfig) -> dict[str, Any]:
    """What of model.yaml makes a frontier's candidates and their figures (JSON values)."""
    return json.loads(json.dumps({
        "widths": list(config.auto_tiers.widths), "shaped": config.auto_tiers.shaped,
        "method": config.method, "multiple_of": config.multiple_of,
        "evaluation": asdict(config.evaluation) if config.evaluation else None,
        "max_batch": config.max_batch, "precision": config.precision,
    }, default=list))  # fmt: skip


def mark_pareto(candidates: list[Candidate], batches: tuple[int, ...] = (1,)) -> list[Candidate]:
    """The same candidates with ``pareto`` set: True where, at one of ``batches`` at least,
    no other candidate is as accurate and as fast while strictly better in one of the two.

    Example:
        >>> a = Candidate("a", {}, 1.0, 4, 4, 0.99, {"1": {"p50_ms": 4.0}}, "")
        >>> b = Candidate("b", {}, 0.5, 1, 1, 0.97, {"1": {"p50_ms": 1.0}}, "")
        >>> c = Candidate("c", {}, 0.7, 2, 2, 0.96, {"1": {"p50_ms": 2.0}}, "")
        >>> [x.pareto for x in mark_pareto([a, b, c])]
        [True, True, False]
    """

    def beaten(c: Candidate, batch: int) -> bool:
        t, a = c.p50_ms(batch), c.accuracy
        return any(
            o.p50_ms(batch) <= t and o.accuracy >= a and (o.p50_ms(batch) < t or o.accuracy > a)
            for o in candidates
            if o is not c
        )

    return [
        Candidate(**{**asdict(c), "pareto": not all(beaten(c, b) for b in batches)})
        for c in candidates
    ]


@dataclass(frozen=True)
class ActiveTiers:
    """``auto_tiers.json``: the tier set auto-tiering chose, and why."""

    tiers: tuple[str, ...]
    frontier_sha256: str  # Frontier.source_sha256 the names refer to
    chosen_at: str
    reason: dict[str, Any]  # expected gain, traffic summary, the set it replaced
    # The chosen candidates' ONNX hashes (None: chosen by an innfer that did not record
    # them): what lets the choice outlive a rebuild that measured the same networks again.
    onnx_sha256: dict[str, str] | None = None

    def carries_over(self, frontier: Frontier) -> bool:
        """Whether this choice, made on another frontier, names the same networks in
        ``frontier``: every chosen candidate there, its ONNX byte-identical. A build by a
        newer innfer re-measures the frontier (its source hash changes with the sampler)
        and the choice was set aside - the hand-written tiers served until auto-tiering
        chose again, ``min_interval_s`` and traffic later - even when nothing it serves
        had changed (review 143 F4)."""
        if self.onnx_sha256 is None:
            return False
        names = {c.name: c.onnx_sha256 for c in frontier.candidates}
        return all(names.get(t) == self.onnx_sha256.get(t) is not None for t in self.tiers)

    def write(self, path: Path) -> None:
        data = asdict(self)
        data["tiers"] = list(self.tiers)
        write_json(path, data)

    @classmethod
    def read(cls, path: Path) -> ActiveTiers | None:
        """The choice in ``path``; None when there is none yet."""
        try:
            data = known_fields(cls, json.loads(Path(path).read_text()), path)
            tiers = data["tiers"]
            # A set is one or more distinct candidate names: an empty list loaded a model
            # with no tiers (the runtime then failed on max() of nothing), a string was read
            # as one tier per letter, a repeated name served one engine twice.
            if (
                not isinstance(tiers, list)
                or not tiers
                or not all(isinstance(t, str) for t in tiers)
                or len(set(tiers)) < len(tiers)
            ):
                raise ValueError(f"tiers: got {tiers!r}, expected distinct candidate names")
            hashes = data.get("onnx_sha256")
            if hashes is not None and not (
                isinstance(hashes, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())
            ):
                raise ValueError(f"onnx_sha256: got {hashes!r}, expected candidate: hash")
            # Auto-tiering's rebuild interval counts from it: an unreadable one let the next
            # swap come at once, with nothing said.
            try:
                seconds(data["chosen_at"])
            except (ValueError, TypeError):
                raise ValueError(
                    f"chosen_at: got {data['chosen_at']!r}, expected a UTC time like {stamp(0)!r}"
                ) from None
            return cls(**{**data, "tiers": tuple(tiers)})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # bad JSON, not UTF-8
            raise RepositoryError(
                f"{path} is corrupted ({exc}): the hand-written tiers are served until "
                "auto-tiering chooses again (delete it to say no more of it)"
            ) from None
        except OSError as exc:  # a folder in its place, an I/O error (helper-271)
            if isinstance(exc, PermissionError):
                raise
            raise RepositoryError(
                f"{path} cannot be read ({exc.strerror or exc}): the hand-written tiers are "
                "served until auto-tiering chooses again (remove it to say no more of it)"
            ) from None
