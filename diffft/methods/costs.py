"""DxMI's cost-to-go: small modules, one per way of learning (or fixing) it, picked by
``method.cost._target_``.

In diffft's time index (``diffft.methods.dxmi``: the chain steps ``x_K -> ... -> x_0``, ``x_0`` =
the sample) the cost-to-go of ``x_k`` is ``V_k(x)``, ``k = 0..K``, and ``V_0 = E``, the terminal
cost (DxMI Sec. 4: the value recursion closes on the energy). Each module

* ``value(x, k)``: ``V_k(x)`` per point, shape ``[n]``, for a LongTensor ``k`` of steps in
  ``0..K`` that may mix steps (each point gets its own ``V_k``, ``k = 0`` its terminal cost);
* ``energy(x)``: the learned energy ``E = V_0``, or ``energy = None`` when it learns none (a fixed
  cost, DxDP); ``terminal(x)`` is ``V_0`` in both cases;
* ``parts()``: its trainable parameters by optimiser, ``value`` (and ``energy`` when the energy
  is a separate network with its own optimiser and learning rate);
* ``time_costs``: ``R(k)`` of Alg. 2 / Eq. 12 for ``k = 0..K`` when ``time_cost`` is set (the
  TD target then adds ``R(k)`` instead of the running costs of Alg. 1), else None.

The four modules (config ``method.cost: {_target_: diffft.methods.costs.NAME, ...}``):

* ``SeparateEnergyValue``: a separate energy network ``E`` and a value ``V_k``, ``k >= 1``
  (time-conditioned ``V(x, k - 1)``, or ``V(x)`` with ``time_dependent: false``);
* ``SharedTimeValue``: one time-conditioned value over ``K + 1`` steps whose step 0 is the
  energy (the paper's 2-D setup, Alg. 1);
* ``TimeIndependentValue``: one ``V(x)`` for every step, the energy too (the paper's image setup,
  Alg. 2, with ``time_cost: sigmoid``);
* ``FixedReward``: DxDP, a fixed terminal cost (any callable on points ``[n, D] -> [n]``) and a
  value ``V_k``, ``k >= 1``, as in ``SeparateEnergyValue``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from torch import nn

from diffft.methods.losses import TIME_COSTS
from diffft.methods.losses import time_cost as time_cost_table


class CostToGo(nn.Module):
    """The base of the cost-to-go modules (see the module docstring). Args of every module:
    event_shape: the shape of one sample (filled in by DxMI).
    steps: K, the chain's steps (filled in by DxMI).
    time_cost: null (the running costs of Alg. 1 in the TD target) or ``sigmoid`` | ``linear`` |
        ``none`` (Alg. 2, Eq. 12); time_cost_c: the linear cost c.
    """

    # The learned energy ``E = V_0`` (points -> [n], low on data), or None: none is learned.
    energy: Callable[[torch.Tensor], torch.Tensor] | None

    def __init__(self, steps: int, time_cost: str | None = None, time_cost_c: float = 0.05) -> None:
        super().__init__()
        self.steps = steps
        if time_cost is not None and time_cost not in TIME_COSTS:
            raise ValueError(f"method.cost.time_cost={time_cost!r}; expected one of {TIME_COSTS}")
        table = None if time_cost is None else time_cost_table(time_cost, steps, time_cost_c)
        self.register_buffer("time_costs", table, persistent=False)

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        """``V_0(x) = E(x)`` per point, shape ``[n]``."""
        assert self.energy is not None
        return self.energy(x)

    def value(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``V_k(x)`` per point, shape ``[n]``."""
        raise NotImplementedError

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimiser: ``value`` (and ``energy``)."""
        raise NotImplementedError


def build_value(cfg: dict[str, Any], event_shape: list[int], n_steps: int | None) -> nn.Module:
    """The value network of ``cfg``: time-conditioned over ``n_steps`` steps, or (None) of x
    alone."""
    if n_steps is not None:
        return instantiate(cfg, event_shape=event_shape, n_steps=n_steps)
    if "TimeMLP" in str(cfg.get("_target_", "")):
        raise ValueError(
            "a time-independent value (method.cost.time_dependent=false, or "
            "diffft.methods.costs.TimeIndependentValue) needs a network without a time input: "
            "set method.cost.value._target_=diffft.nets.mlp.MLP (or your own net of x alone)"
        )
    return instantiate(cfg, event_shape=event_shape)


class _TerminalAndValue(CostToGo):
    """``V_0`` = ``terminal`` (a network or a fixed cost), ``V_k`` (k >= 1) = ``value_net``:
    ``value_net(x, k - 1)`` (time-conditioned over K steps) or ``value_net(x)``."""

    value_net: nn.Module
    time_dependent: bool

    def _value(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            return self.value_net(x, k - 1).view(-1)
        return self.value_net(x).view(-1)

    def value(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # V_0 and V_k (k >= 1) are different functions: each runs on its own rows (a batch of
        # mixed steps, e.g. the TD targets of k = 1), and the rows go back to their order.
        last = k == 0
        if bool(last.all()):
            return self.terminal(x)
        if not bool(last.any()):
            return self._value(x, k)
        i0, i1 = last.nonzero().view(-1), (~last).nonzero().view(-1)
        vals = torch.cat([self.terminal(x[i0]), self._value(x[i1], k[i1])])
        return vals[torch.argsort(torch.cat([i0, i1]))]


class SeparateEnergyValue(_TerminalAndValue):
    """A separate energy network ``E = V_0`` (own optimiser, ``lr.energy``) and a value network
    for ``V_k``, ``k >= 1``.
    value / energy: network configs (``_target_`` + kwargs; ``event_shape`` and the value's
    ``n_steps`` = K are filled in).
    time_dependent: ``V(x, k - 1)`` (true) or ``V(x)`` for every step >= 1 (false).
    """

    def __init__(
        self,
        event_shape: list[int],
        steps: int,
        value: dict[str, Any],
        energy: dict[str, Any],
        time_dependent: bool = True,
        time_cost: str | None = None,
        time_cost_c: float = 0.05,
    ) -> None:
        super().__init__(steps, time_cost, time_cost_c)
        self.time_dependent = time_dependent
        self.value_net = build_value(value, event_shape, steps if time_dependent else None)
        self.energy_net = instantiate(energy, event_shape=event_shape)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy_net(x).reshape(x.shape[0])

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {
            "value": list(self.value_net.parameters()),
            "energy": list(self.energy_net.parameters()),
        }


class SharedTimeValue(CostToGo):
    """One time-conditioned value network over K + 1 steps, ``V_k(x) = V(x, k)``, whose step 0
    is the energy (the paper's 2-D setup); the energy step then trains the value network with
    the value's optimiser.
    value: its network config (``event_shape`` and ``n_steps`` = K + 1 are filled in).
    """

    def __init__(
        self,
        event_shape: list[int],
        steps: int,
        value: dict[str, Any],
        time_cost: str | None = None,
        time_cost_c: float = 0.05,
    ) -> None:
        super().__init__(steps, time_cost, time_cost_c)
        self.value_net = build_value(value, event_shape, steps + 1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.value_net(x, zero).view(-1)

    def value(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.value_net(x, k).view(-1)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"value": list(self.value_net.parameters())}


class TimeIndependentValue(CostToGo):
    """One network ``V(x)`` for every step, the energy too (``E = V``; the paper's image setup,
    Alg. 2, where the time cost ``R(k)`` makes the steps' values differ in the TD targets).
    value: its network config, without a time input (``event_shape`` is filled in).
    """

    def __init__(
        self,
        event_shape: list[int],
        steps: int,
        value: dict[str, Any],
        time_cost: str | None = None,
        time_cost_c: float = 0.05,
    ) -> None:
        super().__init__(steps, time_cost, time_cost_c)
        self.value_net = build_value(value, event_shape, None)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.value_net(x).view(-1)

    def value(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.value_net(x).view(-1)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"value": list(self.value_net.parameters())}


class FixedReward(_TerminalAndValue):
    """DxDP (Sec. 4): a *fixed* terminal cost instead of a learned energy (no energy step), and
    a value network for ``V_k``, ``k >= 1`` (as ``SeparateEnergyValue``'s).
    reward: ``{_target_: pkg.fn, **kwargs}``, a callable on points ``[n, D] -> [n]`` (or a class
        building one; see ``build_reward``).
    reward_is: ``cost`` (minimised) | ``reward`` (its negative is minimised).
    value / time_dependent: as ``SeparateEnergyValue``'s.
    """

    energy = None

    def __init__(
        self,
        event_shape: list[int],
        steps: int,
        value: dict[str, Any],
        reward: dict[str, Any],
        reward_is: str = "cost",
        time_dependent: bool = True,
        time_cost: str | None = None,
        time_cost_c: float = 0.05,
    ) -> None:
        super().__init__(steps, time_cost, time_cost_c)
        if reward_is not in ("cost", "reward"):
            raise ValueError(f"method.cost.reward_is={reward_is!r}; expected 'cost' or 'reward'")
        self.reward_is = reward_is
        self.time_dependent = time_dependent
        self.reward = build_reward(reward)  # (built first: it may draw random weights)
        self.value_net = build_value(value, event_shape, steps if time_dependent else None)

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reward(x).reshape(x.shape[0])
        return r if self.reward_is == "cost" else -r

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"value": list(self.value_net.parameters())}


def build_reward(cfg: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed cost ``[n, D] -> [n]`` from ``{_target_: pkg.fn, **kwargs}``: a function gets
    the kwargs bound (``functools.partial``), a class is instantiated with them (an
    ``nn.Module`` is frozen)."""
    cfg = dict(cfg)
    if "_target_" not in cfg:
        raise ValueError(f"method.cost.reward={cfg}: expected {{_target_: my_pkg.my_cost, ...}}")
    try:
        target = get_object(cfg["_target_"])
    except Exception as err:  # hydra wraps the ImportError
        raise ValueError(
            f"method.cost.reward._target_='{cfg['_target_']}' cannot be imported: {err}"
        ) from None
    if isinstance(target, type):
        module = instantiate(cfg)
        return module.requires_grad_(False) if isinstance(module, nn.Module) else module
    return instantiate(cfg, _partial_=True)


def build_cost(cfg: dict[str, Any], event_shape: list[int], steps: int) -> CostToGo:
    """The ``CostToGo`` module of ``method.cost`` (``{_target_: ..., **kwargs}``) for a K-step
    chain. Built by hand rather than by hydra's ``instantiate``: the nested network configs stay
    configs (each module builds its networks), and errors are the module's own."""
    cfg = dict(cfg)
    target = cfg.pop("_target_", None)
    try:
        cls = get_object(target) if isinstance(target, str) else None
    except Exception as err:  # hydra wraps the ImportError
        raise ValueError(f"method.cost._target_='{target}' cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, CostToGo)):
        raise ValueError(
            f"method.cost._target_={target!r}: expected a diffft.methods.costs.CostToGo "
            "(SeparateEnergyValue, SharedTimeValue, TimeIndependentValue or FixedReward)"
        )
    if "reward" in cfg and cls is not FixedReward:
        raise ValueError(
            f"method.cost has a reward but picks {cls.__name__}: a fixed cost (DxDP) is "
            "method.cost._target_=diffft.methods.costs.FixedReward (on an experiment with a "
            "separate energy, also ~method.cost.energy)"
        )
    return cls(event_shape=event_shape, steps=steps, **cfg)


def cost_config_of(hparams: dict[str, Any]) -> dict[str, Any]:
    """``method.cost`` of the hyper-parameters saved by DxMI before ``method.cost`` existed
    (``value``, ``energy``, ``reward``, ``reward_is``, ``time_dependent``, ``time_cost``,
    ``time_cost_c`` at the method's top level): the module that computed the same cost-to-go."""
    value = hparams.get("value")
    energy, reward = hparams.get("energy"), hparams.get("reward")
    time_dependent = hparams.get("time_dependent", True)
    common = {
        "value": value,
        "time_cost": hparams.get("time_cost"),
        "time_cost_c": hparams.get("time_cost_c", 0.05),
    }
    name = "diffft.methods.costs."
    if reward is not None:
        return {"_target_": name + "FixedReward", "reward": reward,
                "reward_is": hparams.get("reward_is", "cost"),
                "time_dependent": time_dependent, **common}  # fmt: skip
    if energy is not None:
        return {"_target_": name + "SeparateEnergyValue", "energy": energy,
                "time_dependent": time_dependent, **common}  # fmt: skip
    if time_dependent:
        return {"_target_": name + "SharedTimeValue", **common}
    return {"_target_": name + "TimeIndependentValue", **common}


# State-dict prefixes of DxMI checkpoints from before ``method.cost``, and what they are now.
LEGACY_PREFIXES = {"value.": "cost.value_net.", "energy.": "cost.energy_net.",
                   "reward_fn.": "cost.reward."}  # fmt: skip
