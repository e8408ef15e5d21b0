"""mm_llama.encoders — see DESIGN.md for what this folder owns."""
