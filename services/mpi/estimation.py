"""Match weights learned from the index's own records: EM estimates of m / u per comparison
level, made automatically around a bulk load large enough to estimate from and on demand
(`hie mpi weights --estimate`), stored with what they rest on (`store.MatchEstimate`).

u (how often different people land on a level) is counted from pairs of records drawn at random,
which are almost all different people, and held fixed; m (how often one person's records do) and
the share of matches are estimated by EM over candidate pairs (records sharing a blocking key),
as splink does. Pairs of one domain are left out: a hospital's own duplicates are for it to
merge, and most such pairs are namesakes, not matches. An estimate resting on too few records or
too few expected matches is not stored (the census priors stay in force: a cold start).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy.ext.asyncio import AsyncSession

from services.mpi import matching, store

# Below these an estimate rests on a handful of matches: degenerate weights. The index must
# hold MIN_INDEX records (the random pairs u is counted from, and someone to match); the sample
# (a load's rows, or stored records) MIN_RECORDS, finding MIN_EXPECTED_MATCHES matches.
MIN_INDEX = 500
MIN_RECORDS = 200
MIN_EXPECTED_MATCHES = 100
# Records sampled (a load's rows, or stored records), random pairs counted for u.
SAMPLE = 5_000
RANDOM_PAIRS = 50_000
_CANDIDATES_PER_RECORD = 50


@dataclass(frozen=True)
class Estimate:
    """EM-estimated parameters and what they rest on."""

    parameters: matching.MatchParameters
    records: int
    candidate_pairs: int
    random_pairs: int
    # Records in the index the estimate is for (its thresholds follow from it).
    population: int = 0

    @property
    def expected_matches(self) -> float:
        """Candidate pairs EM takes for matches (the match share times the pairs)."""
        return self.parameters.prior_match * self.candidate_pairs

    @property
    def reliable(self) -> bool:
        """Enough records and matches for the estimate to be used."""
        return (
            self.population >= MIN_INDEX
            and self.records >= MIN_RECORDS
            and self.expected_matches >= MIN_EXPECTED_MATCHES
        )


async def estimate(
    session: AsyncSession,
    sample: Sequence[matching.MatchRecord],
    start: matching.MatchParameters,
    *,
    population: int,
    seed: int = 1,
) -> Estimate:
    """EM over the candidate pairs the sampled records find in the index (another domain's
    records), u from random pairs of a sampled record and a stored one of another domain."""
    vectors: list[dict[str, str]] = []
    for record in sample:
        for candidate in await store.candidates(session, matching.search_keys(record), limit=_CANDIDATES_PER_RECORD):
            if candidate.id != record.record_id and candidate.domain != record.domain:
                vectors.append(matching.compare(record, store.match_record_of(candidate)))
    others = [store.match_record_of(r) for r in await store.random_records(session, SAMPLE)]
    rng = random.Random(seed)
    random_vectors: list[dict[str, str]] = []
    if sample and others:
        for _ in range(min(RANDOM_PAIRS, 10 * len(sample) * 2)):
            a, b = rng.choice(sample), rng.choice(others)
            if a.domain != b.domain:
                random_vectors.append(matching.compare(a, b))
    parameters = matching.estimate_parameters(vectors, start, random_vectors=random_vectors)
    if parameters.match_weights and sample:
        # The share of records with a match among the others (the link threshold's prior: a
        # load of mostly new people needs more evidence per link for the same precision).
        matches = sum(n for _, n in parameters.match_weights)
        parameters = replace(parameters, matches_per_record=min(max(matches / len(sample), 1e-3), 1.0))
    return Estimate(parameters, len(sample), len(vectors), len(random_vectors), population)


async def estimate_from_index(
    session: AsyncSession, start: matching.MatchParameters, *, sample: int = SAMPLE
) -> Estimate:
    """An estimate from up to `sample` stored records drawn at random."""
    records = [store.match_record_of(r) for r in await store.random_records(session, sample)]
    return await estimate(session, records, start, population=await store.active_count(session))


async def save(session: AsyncSession, result: Estimate, *, source: str) -> store.MatchEstimate:
    """Store an estimate (in force for every index using estimates from their next look)."""
    return await store.save_estimate(
        session,
        source=source,
        records=result.records,
        candidate_pairs=result.candidate_pairs,
        random_pairs=result.random_pairs,
        parameters=matching.estimate_json(result.parameters, population=result.population),
    )
