"""torchtune-blah's YAML configs, registered with torchtune's CLI (``tune ls``)."""
