"""Healing by distillation: KL from the original model's next-token distribution, added to the
LM loss. The teacher runs without gradients in the training precision, one micro-batch at a
time, and its logits are dropped as soon as the loss term is computed."""

import torch
import torch.nn.functional as F

from ..errors import UserError
from .recipe import DistillSection
from ..loading import load_model


class Distiller:
    def __init__(self, section: DistillSection, device: torch.device, dtype: torch.dtype, vocab_size: int):
        self.weight = section.weight
        self.temperature = section.temperature
        self.teacher = load_model(section.teacher, dtype=dtype).to(device).eval()
        self.teacher.requires_grad_(False)
        teacher_vocab = self.teacher.get_output_embeddings().weight.shape[0]
        if teacher_vocab != vocab_size:
            raise UserError(f"the teacher's vocabulary ({teacher_vocab}) differs from the student's ({vocab_size})")

    def loss(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(teacher || student) per token (mean over the tokens that predict a next token)."""
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits[:, :-1]
            target = F.log_softmax(teacher_logits.float() / self.temperature, dim=-1)
            del teacher_logits
        student = F.log_softmax(student_logits[:, :-1].float() / self.temperature, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1).mean()
        return self.weight * self.temperature**2 * kl
