"""Per-capability preference pairs from the aspect scores a dataset already carries (DMoERM capability labels)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from moerm.data.schema import PreferencePair


def oriented_pair(pair: PreferencePair, capability: str, chosen_is_better: bool) -> PreferencePair:
    """`pair` relabelled for one capability: the better reply becomes `chosen`.

    The overall margin says nothing about this capability, so it is dropped; the aspect dicts follow their replies.
    """
    if chosen_is_better:
        chosen, rejected = pair.chosen, pair.rejected
        a_chosen, a_rejected = pair.aspects_chosen, pair.aspects_rejected
    else:
        chosen, rejected = pair.rejected, pair.chosen
        a_chosen, a_rejected = pair.aspects_rejected, pair.aspects_chosen
    return replace(pair, id=f"{pair.id}:{capability}", subset=capability, margin=None, chosen=chosen,
                   rejected=rejected, aspects_chosen=a_chosen, aspects_rejected=a_rejected)


def capability_pairs(pairs: Iterable[PreferencePair], capability: str) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs oriented by one aspect score: the reply scored higher on `capability` is `chosen`.

    Pairs lacking the aspect on either side are counted as `missing`, equal scores as `ties`; both are dropped.
    `flipped` counts kept pairs whose orientation differs from the overall label.
    """
    out: list[PreferencePair] = []
    counts = {"total": 0, "kept": 0, "flipped": 0, "ties": 0, "missing": 0}
    for pair in pairs:
        counts["total"] += 1
        a = (pair.aspects_chosen or {}).get(capability)
        b = (pair.aspects_rejected or {}).get(capability)
        if a is None or b is None:
            counts["missing"] += 1
        elif a == b:
            counts["ties"] += 1
        else:
            out.append(oriented_pair(pair, capability, chosen_is_better=a > b))
            counts["kept"] += 1
            counts["flipped"] += a < b
    return out, counts


def available_aspects(pairs: Iterable[PreferencePair]) -> dict[str, int]:
    """Aspect name -> number of pairs scored on it on both sides (the only ones `capability_pairs` can use)."""
    counts: Counter[str] = Counter()
    for pair in pairs:
        counts.update(set(pair.aspects_chosen or {}) & set(pair.aspects_rejected or {}))
    return dict(sorted(counts.items()))
