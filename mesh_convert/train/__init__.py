"""Training: recipe -> data -> loop -> checkpoint (Accelerate; LoRA via peft; healing by annealing)."""
