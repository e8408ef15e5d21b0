"""mm_llama.data — see DESIGN.md for what this folder owns."""
