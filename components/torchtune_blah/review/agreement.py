"""Several reviewers per item: each item's final answer, how much the reviewers agree, and the
training records the review produces.

Two answers agree when the official SQuAD normalisation makes them equal (case, punctuation,
articles, spaces; ``"?"`` is the empty answer). An item is

- ``pending`` while it has fewer than ``overlap`` votes (skips are not votes),
- ``agreed`` when more than half of its votes give one answer (that answer is final),
- ``disagreement`` otherwise, until an admin ``resolve``s it (``resolved``: the admin's answer).

Agreement on whether the context holds an answer at all is also given as Cohen's kappa for each
pair of reviewers (over the items both decided) and Fleiss' kappa over the items with exactly
``overlap`` votes.
"""

import statistics
from collections import Counter
from datetime import datetime
from itertools import combinations
from typing import Any, Dict, List, Optional, Tuple

from torchtune_blah.data.squad import NO_ANSWER
from torchtune_blah.eval.metrics import normalize_answer
from torchtune_blah.review.sources import item_view



def normalized(answer: Optional[str]) -> str:
    return "" if answer in (None, NO_ANSWER) else normalize_answer(answer)


def item_status(votes: List[Dict[str, Any]], overlap: int,
                resolution: Optional[Dict[str, Any]] = None) -> Tuple[str, Optional[Dict[str, Any]]]:
    """``(status, final)``: ``final`` is the resolution, or the latest vote of the majority answer."""
    if resolution is not None:
        return "resolved", resolution
    if len(votes) < overlap:
        return "pending", None
    counts = Counter(normalized(v["answer"]) for v in votes)
    answer, count = counts.most_common(1)[0]
    if count * 2 <= len(votes):
        return "disagreement", None
    return "agreed", [v for v in votes if normalized(v["answer"]) == answer][-1]


def cohen_kappa(a: List[bool], b: List[bool]) -> Optional[float]:
    """Cohen's kappa of two raters' yes/no labels on the same items (None when chance explains all)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return None if expected >= 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(labels: List[List[bool]]) -> Optional[float]:
    """Fleiss' kappa of yes/no labels, the same number of raters (>= 2) per item."""
    if not labels or len(labels[0]) < 2 or any(len(x) != len(labels[0]) for x in labels):
        return None
    n = len(labels[0])
    per_item = [((sum(x) ** 2 + (n - sum(x)) ** 2) - n) / (n * (n - 1)) for x in labels]
    p_yes = sum(sum(x) for x in labels) / (len(labels) * n)
    expected = p_yes ** 2 + (1 - p_yes) ** 2
    return None if expected >= 1 else (statistics.fmean(per_item) - expected) / (1 - expected)


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


def review_state(db) -> Dict[str, Any]:
    """Everything agreement is computed from, read once."""
    return {"overlap": db.overlap, "items": db.items(), "votes": db.votes_by_item(), "resolutions": db.resolutions()}


def statuses(state: Dict[str, Any]) -> Dict[int, Tuple[str, Optional[Dict[str, Any]]]]:
    return {item_id: item_status(state["votes"].get(item_id, []), state["overlap"], state["resolutions"].get(item_id))
            for item_id in state["items"]}


def stats(db) -> Dict[str, Any]:
    """Counts by status, agreement overall and per pair, and per-reviewer numbers."""
    state = review_state(db)
    status = statuses(state)
    counts = Counter(s for s, _ in status.values())
    multi = [v for v in state["votes"].values() if len(v) >= 2]
    by_reviewer: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for item_id, votes in state["votes"].items():
        for v in votes:
            by_reviewer.setdefault(v["reviewer"], {})[item_id] = v
    pairs = []
    for a, b in combinations(sorted(by_reviewer), 2):
        common = sorted(set(by_reviewer[a]) & set(by_reviewer[b]))
        if not common:
            continue
        va, vb = [by_reviewer[a][i] for i in common], [by_reviewer[b][i] for i in common]
        pairs.append({"reviewers": [a, b], "items": len(common),
                      "exact_agreement": _round(sum(normalized(x["answer"]) == normalized(y["answer"])
                                                    for x, y in zip(va, vb)) / len(common)),
                      "cohen_kappa_has_answer": _round(cohen_kappa([normalized(x["answer"]) != "" for x in va],
                                                                   [normalized(y["answer"]) != "" for y in vb]))})
    full = [v for v in state["votes"].values() if len(v) == state["overlap"] >= 2]
    reviewers = {}
    for name, votes in sorted(by_reviewer.items()):
        finals = [(v, status[i][1]) for i, v in votes.items() if status[i][1] is not None]
        seconds = [v["seconds"] for v in votes.values() if v.get("seconds") is not None]
        model = [normalized(v["answer"]) == normalized(state["items"][i]["model_answer"]) for i, v in votes.items()]
        reviewers[name] = {
            "decided": len(votes),
            "median_seconds": _round(statistics.median(seconds)) if seconds else None,
            "agreement_with_final": _round(sum(normalized(v["answer"]) == normalized(f["answer"]) for v, f in finals)
                                           / len(finals)) if finals else None,
            "agreement_with_model": _round(sum(model) / len(model)) if model else None,
        }
    return {
        "overlap": state["overlap"], "items": len(state["items"]),
        **{k: counts.get(k, 0) for k in ("pending", "agreed", "disagreement", "resolved")},
        "items_with_two_or_more_votes": len(multi),
        "exact_agreement": _round(sum(len({normalized(v["answer"]) for v in votes}) == 1 for votes in multi)
                                  / len(multi)) if multi else None,
        "fleiss_kappa_has_answer": _round(fleiss_kappa([[normalized(v["answer"]) != "" for v in votes]
                                                        for votes in full])),
        "fleiss_items": len(full), "pairs": pairs, "reviewers": reviewers,
    }


def disagreements(db) -> List[Dict[str, Any]]:
    """Items whose reviewers disagree, with every vote, for an admin to resolve."""
    state = review_state(db)
    out = []
    for item_id, (status, _) in statuses(state).items():
        if status == "disagreement":
            votes = [{"reviewer": v["reviewer"], "action": v["action"], "answer": v["answer"],
                      "answer_start": v["answer_start"], "note": v["note"]} for v in state["votes"][item_id]]
            out.append({"item": item_view(state["items"][item_id]), "votes": votes})
    return out


def corrections(db, since: Optional[datetime] = None) -> Tuple[List[Dict[str, Any]], List[str], int]:
    """Training records (``id, title, context, question, answers`` with ``answer_start``, and who
    decided), one per question with a final answer; across several items of one question the
    latest final answer wins. Also the qids of items in disagreement and how many are pending.
    ``since``: only answers made final after this time (an aware datetime; our stamps are UTC ISO)."""

    state = review_state(db)
    latest: Dict[str, Tuple[str, Dict[str, Any], Dict[str, Any], str]] = {}
    unresolved, pending = [], 0
    for item_id, (status, final) in statuses(state).items():
        item = state["items"][item_id]
        if status == "disagreement":
            unresolved.append(item["qid"])
        pending += status == "pending" and item_id in state["votes"]
        if final is None:
            continue
        stamp = final.get("resolved_at") or final["decided_at"]
        if item["qid"] not in latest or stamp > latest[item["qid"]][0]:
            latest[item["qid"]] = (stamp, item, final, status)
    records = []
    for stamp, item, final, status in sorted(latest.values(), key=lambda x: x[0]):
        if since is not None and datetime.fromisoformat(stamp) <= since:
            continue
        answers = [] if final["answer"] == NO_ANSWER else [{"text": final["answer"],
                                                           "answer_start": final["answer_start"]}]
        agreeing = sorted({v["reviewer"] for v in state["votes"].get(item["id"], [])
                           if normalized(v["answer"]) == normalized(final["answer"])})
        records.append({"id": item["qid"], "title": item["title"], "context": item["context"],
                        "question": item["question"], "answers": answers,
                        "reviewer": final.get("admin") or final["reviewer"], "reviewers": agreeing,
                        "resolution": "admin" if status == "resolved" else "majority", "decided_at": stamp,
                        **({"note": final["note"]} if final.get("note") else {})})
    return records, sorted(set(unresolved)), pending
