"""Model config JSON files shipped with safe-cache (tiny CLIP architectures: tests, demo)."""
