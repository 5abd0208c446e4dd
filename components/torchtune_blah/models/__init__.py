"""Model families beyond torchtune's own builders (SmolLM2), and their offline preparation."""
