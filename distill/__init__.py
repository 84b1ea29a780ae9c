"""distill: turn a Mixture-of-Experts teacher into a dense student.

Public API (small on purpose; the modules are flat and readable):

- ``demo_data.generate_dataset`` -- the built-in smart-home voice-assistant data set
- ``tokenizer.train_tokenizer`` / ``tokenizer.load_tokenizer``
- ``teacher.load_teacher`` -- any local HF MoE causal-LM checkpoint directory
- ``student.build_student`` -- a dense Llama student from a preset
- ``train.distill_student`` / ``train.train_model`` -- the distillation loop (recipes/*.yaml)
- ``cache.build_cache`` / ``cache.TeacherCache`` -- the teacher's top-k, scored once
- ``evaluate.task_accuracy`` -- greedy replies scored on the demo task
"""

from moe2edge.distill.errors import DistillError

__all__ = ["DistillError"]
