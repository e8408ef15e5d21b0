"""mm_llama.train — see DESIGN.md for what this folder owns.

Data-independent training infrastructure: recipes (`recipe`), optimizer and schedule (`optim`),
atomic checkpoints (`checkpointing`), metrics and progress (`metrics`), signal handling (`signals`),
torchrun / DDP / FSDP2 (`distributed`) and the non-finite step guard (`nonfinite`).
"""
