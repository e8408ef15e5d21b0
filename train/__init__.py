"""mm_llama.train — see DESIGN.md for what this folder owns."""
