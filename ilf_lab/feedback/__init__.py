"""Feedback providers: `human` (the annotations) and `llm` k-shot (feedback + refinement) over two backends."""

from ilf_lab.feedback.llm import HFBackend, LLMBackend, OpenAIBackend, llm_feedback

__all__ = ["HFBackend", "LLMBackend", "OpenAIBackend", "llm_feedback"]
