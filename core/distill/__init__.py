"""Knowledge distillation: train a compressed (or smaller) student to match a teacher's next-token distributions.

losses.py: divergences between logits, next-token cross-entropy and hidden-state matching (pure functions).
student.py: turn a compressed model into a trainable student (fake quantization with a straight-through estimator,
masks that keep pruned weights pruned) and back into its compressed modules; build a smaller student from a
teacher. trainer.py: the training loop. step.py: distillation as a step of an experiment.
"""
