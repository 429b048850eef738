"""The shipped studies (*.toml), read by safe_cache.study.spec."""
