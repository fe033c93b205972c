"""Training recipe for the MLLM reasoner: the nine-task SFT curriculum, GRPO rewards and presets,
and the glue to TRL's SFT and GRPO trainers.

Nothing here is imported by ``import echo_agent``; torch / transformers / trl / datasets / peft are
imported inside the functions that need them (``pip install 'echo-agent[train]'``).
"""

from .curriculum import TASKS, CurriculumBuilder, CurriculumConfig, build_curriculum

__all__ = ["TASKS", "CurriculumBuilder", "CurriculumConfig", "build_curriculum"]
