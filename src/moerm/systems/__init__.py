"""Reward systems; importing this package registers the built-in ones."""

from moerm.systems.base import REGISTRY, RewardSystem, build_system, load_system, register
from moerm.systems.baseline import BaseLoRASystem, BaselineSystem
from moerm.systems.more import MoRESystem
from moerm.systems.rodos import RODOSSystem
from moerm.systems.arliss import ARLISSSystem
from moerm.systems.dmoerm import DMoERMSystem
from moerm.systems.ensemble import EnsembleSystem

__all__ = ["REGISTRY", "RewardSystem", "build_system", "load_system", "register", "BaselineSystem", "BaseLoRASystem",
           "MoRESystem", "RODOSSystem", "ARLISSSystem", "DMoERMSystem",
           "EnsembleSystem"]
