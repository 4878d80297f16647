"""runnel entry point for the CTranslate2 backend (hook implementations go here)."""
