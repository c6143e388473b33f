"""Configuration: the schema (`schema`), the per-dataset presets (`presets`) and the layers
preset < YAML file < flags that resolve a run's config (`flags`)."""
