"""The Postfix-side settings and service definitions, as data (settings.toml)."""
