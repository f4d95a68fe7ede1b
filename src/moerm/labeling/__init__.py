"""Capability labels for per-capability experts: from existing aspect scores or from an LLM judge."""

from moerm.labeling.aspects import available_aspects, capability_pairs
from moerm.labeling.judge import JudgeConfig, JudgeConfigError, JudgeError, judge_pairs, parse_verdict

__all__ = ["JudgeConfig", "JudgeConfigError", "JudgeError", "available_aspects", "capability_pairs", "judge_pairs",
           "parse_verdict"]
