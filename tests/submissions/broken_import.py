"""Broken: importing it raises ImportError (a name the contestant's moebench does not have). The harness must say
so on one line."""

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference  # noqa: F401
from moebench.model.qwen3_moe import NoSuchNameForTests  # noqa: F401
