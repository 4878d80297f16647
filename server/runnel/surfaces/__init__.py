"""Built-in surfaces: route tables that speak other APIs' shapes (OpenAI, RunPod, Baseten)."""
