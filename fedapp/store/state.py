"""The server's state between rounds: what a checkpoint must hold besides the model.

Every fedapp strategy wrapper that carries state across rounds has
``state_dict()`` / ``load_state_dict()`` (server momentum, central and
distributed DP accountants, the exclusion list, the detector's reputations and
quarantine, Paillier's decryptor RNG and replay guard). This module walks the
wrapper chain (``wrapper.strategy``) and saves each under its position and
class name, so a checkpoint taken under one configuration cannot be loaded into
a different chain by accident. Flower's own ``FedAvgM`` keeps its momentum in
``momentum_vector``; it is saved here too.

The round-level RNGs are saved as well: Flower's client sampling draws from
Python's ``random`` module and model code from torch's generator, restored so a
resumed run draws what the uninterrupted one would have. numpy's global
generator is deliberately *not* saved: Flower's central-DP wrapper draws its
noise from it, and a saved state would let whoever reads a checkpoint predict
the next round's noise (fedapp reseeds it from the OS before each noisy round).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from flwr.server.strategy import FedAvgM, Strategy

from fedapp.store.checkpoint import CheckpointError


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps, outermost first."""
    chain = [strategy]
    while hasattr(chain[-1], "strategy") and isinstance(getattr(chain[-1], "strategy"), Strategy):
        chain.append(getattr(chain[-1], "strategy"))
    return chain


def _key(index: int, strategy: Strategy) -> str:
    return f"{index}:{type(strategy).__name__}"


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """``{"<position>:<class>": state}`` for every stateful member of the chain."""
    state: dict[str, Any] = {}
    for i, member in enumerate(strategy_chain(strategy)):
        if hasattr(member, "state_dict"):
            state[_key(i, member)] = member.state_dict()
        elif isinstance(member, FedAvgM):
            vector = member.momentum_vector
            state[_key(i, member)] = {"momentum_vector": None if vector is None else [np.copy(v) for v in vector]}
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore :func:`strategy_state`'s output; a chain that does not match is refused."""
    members = {_key(i, m): m for i, m in enumerate(strategy_chain(strategy))}
    expected = {k for k, m in members.items() if hasattr(m, "state_dict") or isinstance(m, FedAvgM)}
    # A member whose state only sharpens a check (UpdateValidation's replay memory) may be missing from a
    # checkpoint written before it had state: it starts empty rather than refusing the resume.
    required = {k for k in expected if not getattr(members[k], "optional_state", False)}
    if not required <= set(state) <= expected:
        raise CheckpointError(
            f"the checkpoint holds state for {sorted(state)} but this run's strategy is {sorted(expected)}: "
            "it was written under another configuration"
        )
    for key, member_state in state.items():
        member = members[key]
        if isinstance(member, FedAvgM) and not hasattr(member, "load_state_dict"):
            vector = member_state["momentum_vector"]
            member.momentum_vector = None if vector is None else [np.asarray(v) for v in vector]
        else:
            member.load_state_dict(member_state)


def rng_state() -> dict[str, Any]:
    """Python's and torch's global RNG states (client sampling, tie-breaking); never numpy's (DP noise)."""
    version, internal, gauss = random.getstate()
    return {
        "python": [version, np.asarray(internal, dtype=np.uint64), gauss],
        "torch": torch.get_rng_state().numpy(),
    }


def load_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))
