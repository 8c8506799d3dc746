"""The named recipes: YAML files of overrides over the configuration tree of util/config.py."""
