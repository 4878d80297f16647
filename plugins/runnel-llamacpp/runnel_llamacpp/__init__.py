"""runnel backend: GGUF models on llama.cpp (through llama-cpp-python)."""
