"""Before a Ray pass starts: does the cluster have what its actors and tasks ask for?

Ray Data waits without end for resources no node has ("pending: 1 CPU, 0.15 GPU"), so every pass the
build starts (the identity bank, the DAG) describes its reservation as a `Demand` and calls `require`.
Locally (no RAY_ADDRESS) nothing will appear later: a shortfall is one error at once. On a cluster an
autoscaler may still add nodes: a warning, then up to `resource_wait_s` of waiting, then the same error.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EPSILON = 1e-9  # Ray's fractional resources are sums of floats
POLL_S = 5.0  # how often a waiting check looks at the cluster again


class ResourceShortfall(ValueError):
    """A Ray pass asks for more than the cluster has (the CLI exits 2)."""


@dataclass(frozen=True)
class Demand:
    """What one Ray pass reserves: `total` over all its actors and tasks at once, `per_actor` on one node
    (an actor cannot span nodes). `fixes` maps a resource to the override that lowers its need."""

    what: str  # the pass and its stages, as the user configured them
    total: dict[str, float]
    per_actor: dict[str, float] = field(default_factory=dict)
    fixes: dict[str, str] = field(default_factory=dict)


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's resources (Ray must be initialised)."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def shortfalls(demand: Demand, nodes: list[dict[str, float]]) -> dict[str, str]:
    """{resource: what is short} for `demand` on `nodes`; empty when it fits."""
    problems: dict[str, str] = {}
    for name, need in demand.total.items():
        have = sum(node.get(name, 0.0) for node in nodes)
        if need > have + EPSILON:
            problems[name] = f"{name}: need {need:g}, cluster has {have:g}"
    wanted = {k: v for k, v in demand.per_actor.items() if v > 0}
    if wanted and not any(all(node.get(k, 0.0) + EPSILON >= v for k, v in wanted.items()) for node in nodes):
        largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in wanted}
        # the resources no node has enough of; when each fits somewhere but never together, all of them
        short = [k for k in wanted if largest[k] + EPSILON < wanted[k]] or list(wanted)
        for name in short:
            problems.setdefault(
                name,
                f"{name}: one actor needs {_amounts(wanted)} on one node, the largest node has "
                f"{_amounts(largest)}",
            )
    return problems


def _amounts(resources: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in resources.items())


def shortfall_message(demand: Demand, problems: dict[str, str]) -> str:
    fixes = [demand.fixes[name] for name in problems if name in demand.fixes]
    text = f"{demand.what} asks for more than the Ray cluster has ({'; '.join(problems.values())})"
    return f"{text}. Fix: {'; '.join(dict.fromkeys(fixes))}" if fixes else text


def require(
    demand: Demand,
    wait_s: float,
    nodes: Callable[[], list[dict[str, float]]] = cluster_nodes,
    poll_s: float = POLL_S,
) -> None:
    """Return once `demand` fits the cluster; raise ResourceShortfall when it does not (locally at once,
    on a cluster after waiting up to `wait_s` seconds for an autoscaler to add nodes)."""
    problems = shortfalls(demand, nodes())
    if not problems:
        return
    message = shortfall_message(demand, problems)
    if not os.environ.get("RAY_ADDRESS"):
        raise ResourceShortfall(message)
    log.warning("%s; waiting up to %g s (resource_wait_s) for the cluster to grow", message, wait_s)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
        problems = shortfalls(demand, nodes())
        if not problems:
            log.info("the cluster now has what %s asks for", demand.what)
            return
    raise ResourceShortfall(
        f"{shortfall_message(demand, problems)}. Waited {wait_s:g} s for the cluster to grow "
        "(resource_wait_s)"
    )
