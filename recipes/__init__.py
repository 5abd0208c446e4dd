"""torchtune-blah's recipes, registered with torchtune's CLI (``tune ls``)."""
