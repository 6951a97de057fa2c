"""Model presets shipped with llmkit (YAML specs, loaded by name); see README.md here."""
