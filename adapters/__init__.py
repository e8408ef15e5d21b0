"""mm_llama.adapters — see DESIGN.md for what this folder owns."""
